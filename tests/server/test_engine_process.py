"""The engine core in a process of its own, seen from outside: when it dies the server fails every open stream,
turns not-ready and exits 1; it stops with the server (SIGTERM, also while the model loads); and it never
outlives the HTTP process, however that one ends."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil
from servers import launch, start, wait_for_metric

LONG = {"model": "tiny", "prompt": "Once", "max_tokens": 30000, "ignore_eos": True, "stream": True}
GONE_TIMEOUT_S = 30


def core_process(server) -> psutil.Process:
    """The HTTP process's spawned child (multiprocessing's spawn_main runs it)."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while time.monotonic() < deadline:
        for child in psutil.Process(server.process.pid).children():
            if any("spawn_main" in part for part in child.cmdline()):
                return child
        time.sleep(0.05)
    raise AssertionError("the server started no engine core process")


def first_answer(url: str) -> httpx.Response:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while True:
        try:
            return httpx.get(url, timeout=10)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.02)


def assert_gone(process: psutil.Process) -> None:
    gone, _ = psutil.wait_procs([process], timeout=GONE_TIMEOUT_S)
    assert gone, f"the engine core (pid {process.pid}) outlived the server"


def test_a_killed_core_ends_open_streams_readiness_turns_503_and_the_server_exits_1(tiny_llama, tmp_path):
    server = start(tiny_llama, tmp_path / "server.log", "--max_model_len=32768")
    answers: list[httpx.Response] = []

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/openai/v1/completions", json=LONG, timeout=120) as response:
            response.read()
            answers.append(response)

    client = threading.Thread(target=stream)
    try:
        client.start()
        wait_for_metric(server, "predictor_num_requests_running", 1)
        core = core_process(server)
        core.send_signal(signal.SIGKILL)
        readiness = []
        while server.process.poll() is None:
            try:
                readiness.append(httpx.get(f"{server.url}/v1/models/tiny", timeout=2).status_code)
            except httpx.TransportError:
                break
        client.join(timeout=60)
        assert server.process.wait(timeout=30) == 1, server.output()[-3000:]
    finally:
        server.stop()
    assert 503 in readiness and 200 not in readiness[readiness.index(503):], readiness  # until it exits
    events = [event.removeprefix("data: ") for event in answers[0].text.split("\n\n") if event]
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["error"]["code"] == 500, events[-3:]  # the details are in the log only
    assert all("choices" in json.loads(event) for event in events[:-2])
    assert "engine failed, exiting: the engine core process was killed by signal 9" in server.output()


def test_sigterm_stops_the_core_with_the_server(tiny_llama, tmp_path):
    server = start(tiny_llama, tmp_path / "server.log", "--max_model_len=512")
    core = core_process(server)
    try:
        ok = httpx.post(f"{server.url}/openai/v1/completions", timeout=60,
                        json={"model": "tiny", "prompt": "Once", "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.output()[-3000:]
    finally:
        server.stop()
    assert_gone(core)


def test_sigterm_while_the_model_loads_exits_0_and_stops_the_core(tiny_llama, tmp_path):
    server = launch(tiny_llama, tmp_path / "server.log", "--max_model_len=512")
    try:
        core = core_process(server)  # started as the HTTP server starts listening
        loading = first_answer(f"{server.url}/v1/models/tiny")
        assert loading.status_code == 503 and "loading" in loading.text, loading.text
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.output()[-3000:]
    finally:
        server.stop()
    assert_gone(core)


def test_the_core_exits_when_the_http_process_is_killed(tiny_llama, tmp_path):
    server = start(tiny_llama, tmp_path / "server.log", "--max_model_len=512")
    core = core_process(server)
    try:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
    finally:
        server.stop()
    assert_gone(core)
