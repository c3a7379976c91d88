"""The server's life outside requests: a graceful stop on SIGTERM (what outlives --shutdown_timeout ends in each
route's error shape, never cut), KServe's model repository unloading and loading the model again, and --host."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest
from servers import listening_addresses, metric, outside_address, start, wait_for_metric

LONG = 30000  # tokens: far more generation than a test lasts
CHAT = [{"role": "user", "content": "Tell me a long story"}]
SHUTTING_DOWN = {"message": "server is shutting down", "type": "service_unavailable", "param": None, "code": 503}

# Requests that would run for minutes: what each answers when the shutdown's grace period ends it.
OUTLIVING = {
    "openai completion stream": ("/openai/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": LONG,
                                                            "ignore_eos": True, "stream": True}),
    "openai chat stream, n=2": ("/openai/v1/chat/completions", {"model": "tiny", "messages": CHAT, "n": 2,
                                                                "max_tokens": LONG, "ignore_eos": True,
                                                                "stream": True}),
    "openai completion": ("/openai/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": LONG,
                                                     "ignore_eos": True}),
    "worker stream": ("/worker_generate_stream", {"prompt": "Once", "max_new_tokens": LONG, "temperature": 0}),
    "v1 predict": ("/v1/models/tiny:predict", {"instances": [{"prompt": "Once", "parameters": {
        "max_new_tokens": LONG, "ignore_eos": True}}]}),
    "kaito generate": ("/generate", {"prompts": ["Once"], "parameters": {"max_gen_len": LONG, "temperature": 0}}),
}
RUNNING = 7  # sequences: the chat stream's two choices and one for each other request


def test_sigterm_ends_what_outlives_the_grace_period_in_each_routes_shape(tiny_llama, tmp_path):
    server = start(tiny_llama, tmp_path / "server.log", "--max_num_seqs=8", "--max_model_len=32768",
                   "--chat_template=llama-2", "--shutdown_timeout=2")
    answers: dict[str, httpx.Response] = {}

    def send(name: str) -> None:
        path, body = OUTLIVING[name]
        with httpx.stream("POST", server.url + path, json=body, timeout=120) as response:
            response.read()
            answers[name] = response

    clients = [threading.Thread(target=send, args=(name,)) for name in OUTLIVING]
    try:
        for client in clients:
            client.start()
        wait_for_metric(server, "predictor_num_requests_running", RUNNING)
        server.process.send_signal(signal.SIGTERM)
        for client in clients:
            client.join(timeout=120)
        assert server.process.wait(timeout=60) == 0, server.output()[-3000:]
    finally:
        server.stop()

    for name in ("openai completion stream", "openai chat stream, n=2"):
        assert answers[name].status_code == 200
        events = [event.removeprefix("data: ") for event in answers[name].text.split("\n\n") if event]
        assert events[-1] == "[DONE]" and json.loads(events[-2]) == {"error": SHUTTING_DOWN}, events[-3:]
        assert all("choices" in json.loads(event) for event in events[:-2]), name  # the text, up to the end
    worker = [json.loads(piece) for piece in answers["worker stream"].text.split("\0") if piece]
    assert worker[-1]["error_code"] == 50001 and worker[-1]["finish_reason"] == "error"
    assert worker[-1]["text"].endswith("(server is shutting down)") and worker[-2]["error_code"] == 0
    for name in ("openai completion", "kaito generate"):
        assert answers[name].status_code == 503 and answers[name].json() == {"error": SHUTTING_DOWN}
    assert answers["v1 predict"].status_code == 503
    assert answers["v1 predict"].json() == {"error": "server is shutting down"}
    log = server.output()
    assert f"ending {RUNNING} running and 0 waiting requests" in log, log[-3000:]
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]


def test_sigterm_lets_running_requests_finish_within_the_grace_period(tiny_llama, tmp_path):
    """A request that fits the grace period ends as it would have; a second SIGTERM ends the rest at once."""
    server = start(tiny_llama, tmp_path / "server.log", "--max_model_len=32768", "--shutdown_timeout=600")
    short = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0, "stream": True}
    long = {**short, "max_tokens": LONG, "ignore_eos": True}
    answers: dict[str, str] = {}

    def send(name: str, body: dict) -> None:
        answers[name] = httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=600).text

    try:
        expected = httpx.post(f"{server.url}/openai/v1/completions", json=short, timeout=300).text
        clients = [threading.Thread(target=send, args=args) for args in (("short", short), ("long", long))]
        for client in clients:
            client.start()
        wait_for_metric(server, "predictor_num_requests_running", 2)
        server.process.send_signal(signal.SIGTERM)
        late = httpx.post(f"{server.url}/openai/v1/completions", json={**short, "stream": False}, timeout=30)
        assert late.status_code == 503 and late.json() == {"error": SHUTTING_DOWN}
        readiness = httpx.get(f"{server.url}/v1/models/tiny", timeout=10)
        assert readiness.status_code == 503 and "shutting down" in readiness.text
        clients[0].join(timeout=600)
        assert metric(server, "predictor_num_requests_running") == 1  # the long one goes on
        server.process.send_signal(signal.SIGTERM)
        clients[1].join(timeout=120)
        assert server.process.wait(timeout=60) == 0, server.output()[-3000:]
    finally:
        server.stop()
    assert answers["short"].endswith("data: [DONE]\n\n")
    assert _stream_text(answers["short"]) == _stream_text(expected) == (_stream_text(expected)[0], "length")
    events = [event.removeprefix("data: ") for event in answers["long"].split("\n\n") if event]
    assert events[-1] == "[DONE]" and json.loads(events[-2]) == {"error": SHUTTING_DOWN}
    assert "SIGTERM again: ending the requests still running now" in server.output()


def _stream_text(reply: str) -> tuple[str, str]:
    """A completion stream's text and finish_reason."""
    chunks = [json.loads(e.removeprefix("data: ")) for e in reply.split("\n\n") if e and e != "data: [DONE]"]
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    return "".join(choice["text"] for choice in choices), choices[-1]["finish_reason"]


# ---- one server on loopback only, with the model repository and /shutdown -------------------------------------


@pytest.fixture(scope="module")
def local(tiny_llama, tmp_path_factory):
    running = start(tiny_llama, tmp_path_factory.mktemp("logs") / "server.log", "--max_model_len=512",
                    "--host=127.0.0.1", "--enable_model_repository", "--enable_shutdown")
    yield running
    running.stop()


def complete(server, timeout: float = 60) -> httpx.Response:
    body = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=timeout)


def test_host_127_0_0_1_serves_this_machine_only(local):
    port = int(local.url.rsplit(":", 1)[1])
    assert {address for address, bound in listening_addresses([local.process.pid]) if bound == port} == {
        "127.0.0.1"}
    assert complete(local).status_code == 200
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address besides loopback to try")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{outside}:{port}/", timeout=5)


def test_an_unloaded_model_loads_again(local):
    expected = complete(local).json()["choices"][0]["text"]
    assert httpx.post(f"{local.url}/v2/repository/models/tiny/unload", timeout=30).status_code == 200
    readiness = httpx.get(f"{local.url}/v1/models/tiny", timeout=10)
    assert readiness.status_code == 503 and "model is unloaded" in readiness.text
    refused = complete(local)
    assert refused.status_code == 503 and "/v2/repository/models/tiny/load" in refused.text, refused.text
    predict = httpx.post(f"{local.url}/v1/models/tiny:predict", json={"instances": [{"prompt": "Hi"}]}, timeout=30)
    assert predict.status_code == 503, predict.text

    loaded = httpx.post(f"{local.url}/v2/repository/models/tiny/load", timeout=30)
    assert loaded.status_code == 200 and loaded.json() == {"name": "tiny", "load": True}, loaded.text
    assert httpx.get(f"{local.url}/v1/models/tiny", timeout=10).status_code == 200
    again = complete(local)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected
    assert httpx.post(f"{local.url}/v2/repository/models/other/unload", timeout=30).status_code == 404


def test_shutdown_after_unload_stops_the_server(local):
    assert httpx.post(f"{local.url}/v2/repository/models/tiny/unload", timeout=30).status_code == 200
    assert metric(local, "predictor_num_requests_running") == 0
    response = httpx.post(f"{local.url}/shutdown", timeout=30)
    assert response.status_code == 200 and response.json() == {"status": "shutting down"}, response.text
    assert local.process.wait(timeout=60) == 0
    assert "Traceback" not in local.output()
