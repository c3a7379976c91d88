"""Tensor parallelism on CPU (gloo): same greedy text as one process, refusal of bad sizes, rank failure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from models import greedy_reference, make_llama
from servers import REPO, listening_addresses, predictor_env, start, wait_for_metric
from test_embeddings import assert_close, reference_embedding
from test_generation import _post_all
from test_structured_output import REPLY_FORMAT, REPLY_SCHEMA

from predictor.engine.cuda_graphs import FAIL_CAPTURE_ENV

PROMPTS = ["Hello", "The capital of France is", "Once upon a time, in a land far away, there lived a"]


def process_parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    return parents


def descendants_of(pid: int) -> set[int]:
    parents = process_parents()
    descendants, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - descendants
        descendants |= frontier
    return descendants


def ranks_of(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes our launcher started (rank 0's engine core, its child, shares its RANK)."""
    ranks = {}
    for pid, parent in process_parents().items():
        if parent != launcher_pid:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in environ:
            if var.startswith(b"RANK="):
                ranks[int(var[5:])] = pid
    return ranks


def assert_tp_structured_output_validates(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    response = client.chat.completions.create(
        model=server.model_name, messages=[{"role": "user", "content": "Reply in JSON"}], max_tokens=64,
        temperature=0, response_format=REPLY_FORMAT)
    jsonschema.validate(json.loads(response.choices[0].message.content), REPLY_SCHEMA)


def test_tp2_gives_the_same_greedy_text_as_generate(tiny_llama, reference, tmp_path):
    """Started with the capture fault injected: on the CPU it serves eagerly either way, and so its start also
    shows both ranks warming up the graphs' forward together (its all-reduces) and falling back together."""
    server = start(tiny_llama, tmp_path / "tp2.log", "--tensor_parallel_size=2", "--max_num_seqs=6",
                   "--max_model_len=256", env=predictor_env(**{FAIL_CAPTURE_ENV: "1"}))
    try:
        fallbacks = [line for line in server.output().splitlines() if "CUDA graphs off:" in line]
        assert len(fallbacks) == 2 and all("batch size 6 failed" in line for line in fallbacks), server.output()
        # Concurrent, different lengths: sequences finish out of slot order, so the ranks also move KV slots.
        bodies = [{"model": server.model_name, "prompt": p, "max_tokens": 4 + 3 * i, "temperature": 0}
                  for i, p in enumerate(PROMPTS * 2)]
        responses = asyncio.run(_post_all(f"{server.url}/openai/v1/completions", bodies))
        for body, response in zip(bodies, responses):
            assert response.status_code == 200, response.text
            expected = greedy_reference(reference, body["prompt"], body["max_tokens"])
            assert response.json()["choices"][0]["text"] == expected
        assert_tp_embeddings_match_one_process(server, reference)
        worker = httpx.post(f"{server.url}/worker_generate", json={"prompt": PROMPTS[1], "temperature": 0,
                                                                   "max_new_tokens": 6, "echo": False}, timeout=60)
        assert worker.json()["text"] == greedy_reference(reference, PROMPTS[1], 6)
        assert_tp_streams_n_choices_with_logprobs(server, reference)
        assert_tp_structured_output_validates(server)
        assert_tp_prefix_cache_hit_keeps_greedy_text(server, reference)
        assert_only_http_faces_the_network(server, descendants_of(server.process.pid))
        assert_a_hung_follower_turns_readiness_503_and_ends_every_rank(server)
    finally:
        server.stop()


READINESS = ["/v1/models/tiny", "/v2/health/ready", "/health", "/healthz"]


def assert_a_hung_follower_turns_readiness_503_and_ends_every_rank(server) -> None:
    """The issue: with the follower SIGSTOPped, readiness said 200 for 60 s while requests hung. The heartbeat
    misses it within seconds: readiness 503, then rank 0 exits and takes the launcher with it. Polled from one
    thread per route: the 503 shows between the miss and the exit, and a refused connection after it."""
    ranks = ranks_of(server.process.pid)
    assert sorted(ranks) == [0, 1]
    answers: dict[str, list] = {path: [] for path in READINESS}

    def poll(path: str) -> None:
        deadline = time.monotonic() + 30  # generous: the heartbeat's timeout is 5 s; this is no speed test
        while time.monotonic() < deadline:
            try:
                answers[path].append(httpx.get(server.url + path, timeout=10).status_code)
            except httpx.TransportError:
                answers[path].append("gone")
                return
            time.sleep(0.01)

    os.kill(ranks[1], signal.SIGSTOP)
    try:
        pollers = [threading.Thread(target=poll, args=(path,)) for path in READINESS]
        for poller in pollers:
            poller.start()
        for poller in pollers:
            poller.join()
    finally:
        # So that the launcher's SIGTERM can end it; the launcher may have killed it already (SIGKILL ends a stopped
        # process).
        with contextlib.suppress(ProcessLookupError):
            os.kill(ranks[1], signal.SIGCONT)
    assert all(seen[-1] == "gone" for seen in answers.values()), answers
    assert all(set(seen) <= {200, 503, "gone"} for seen in answers.values()), answers
    assert any(503 in seen for seen in answers.values()), answers
    assert server.process.wait(timeout=90) != 0
    assert "a tensor-parallel rank did not answer the heartbeat within 5s" in server.output()
    time.sleep(1)
    for pid in ranks.values():
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"rank pid {pid} outlived the launcher"


def assert_tp_embeddings_match_one_process(server, reference) -> None:
    """Sharded, the mean-pooled hidden state must still be the whole model's (gathered across ranks)."""
    _, tokenizer = reference
    response = httpx.post(f"{server.url}/openai/v1/embeddings", json={"model": server.model_name, "input": PROMPTS},
                          timeout=60)
    assert response.status_code == 200, response.text
    for item, prompt in zip(response.json()["data"], PROMPTS):
        assert_close(item["embedding"], reference_embedding(reference, tokenizer(prompt).input_ids))


def assert_tp_streams_n_choices_with_logprobs(server, reference) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(model=server.model_name, prompt=PROMPTS[2], max_tokens=5, temperature=0,
                                       n=2, logprobs=1, stream=True)
    texts, logprobs = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            logprobs[choice.index] += choice.logprobs.token_logprobs if choice.logprobs else []
    assert texts[0] == texts[1] == greedy_reference(reference, PROMPTS[2], 5)
    # The two choices share one packed forward: float32 rounding may differ in the last digits, nothing more.
    assert len(logprobs[0]) == 5 and logprobs[0] == pytest.approx(logprobs[1], abs=1e-5)


def assert_tp_prefix_cache_hit_keeps_greedy_text(server, reference) -> None:
    """Rank 0 alone decides what is cached; the followers only see block tables in the step."""
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)
    prompt = " ".join(f"Step {i} of the long climb;" for i in range(12))
    expected = greedy_reference(reference, prompt, 5)
    for cached in (False, True):
        response = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=5, temperature=0)
        assert response.choices[0].text == expected
        assert (response.usage.prompt_tokens_details.cached_tokens > 0) == cached


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def assert_only_http_faces_the_network(server, processes: set[int]) -> None:
    """The ranks' rendezvous and collectives listen on 127.0.0.1 (torchrun's agent listened on every interface)."""
    http_port = int(server.url.rsplit(":", 1)[1])
    listening = listening_addresses([server.process.pid, *processes])
    assert {address for address, port in listening if port == http_port} == {"0.0.0.0"}
    assert {address for address, port in listening if port != http_port} == {"127.0.0.1"}, listening


def test_tp2_drains_on_sigterm_and_every_rank_exits_0(tiny_llama, tmp_path):
    """A SIGTERM to the launcher reaches rank 0 alone, which ends the stream that outlives the grace period in
    OpenAI's shape, then stops rank 1; every process exits 0."""
    server = start(tiny_llama, tmp_path / "tp2.log", "--tensor_parallel_size=2", "--max_model_len=32768",
                   "--max_num_seqs=2", "--shutdown_timeout=2")
    try:
        ranks = ranks_of(server.process.pid)
        body = {"model": server.model_name, "prompt": "Once", "max_tokens": 30000, "ignore_eos": True, "stream": True}
        answer: list[str] = []
        client = threading.Thread(target=lambda: answer.append(
            httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=120).text))
        client.start()
        wait_for_metric(server, "predictor_num_requests_running", 1)
        server.process.send_signal(signal.SIGTERM)
        client.join(timeout=120)
        assert server.process.wait(timeout=90) == 0, server.output()[-3000:]
        assert not any(Path(f"/proc/{pid}").exists() and not _is_zombie(pid) for pid in ranks.values())
    finally:
        server.stop()
    events = [event.removeprefix("data: ") for event in answer[0].split("\n\n") if event]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["message"] == "server is shutting down"
    assert "Traceback" not in server.output(), server.output()[-3000:]


def test_kv_heads_not_divisible_are_refused_at_load(tokenizer_dir, tmp_path):
    model_dir = make_llama(tmp_path / "one-kv-head", tokenizer_dir, num_key_value_heads=1)
    result = subprocess.run(
        [sys.executable, "-m", "predictor", f"--model_dir={model_dir}", "--tensor_parallel_size=2"],
        cwd=REPO, env=predictor_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "tensor_parallel_size: 2 does not divide" in result.stderr
    assert "1 KV heads" in result.stderr
