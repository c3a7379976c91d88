"""Back-pressure, cancellation and readiness of the real server."""

from __future__ import annotations

import threading
import time

import httpx
from servers import held_request, launch, metric, start, wait_for_metric, wait_for_metrics, wait_ready


def predict(server, parameters: dict, timeout: float = 120) -> httpx.Response:
    body = {"instances": [{"prompt": "Once upon a time", "parameters": parameters}]}
    return httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=body, timeout=timeout)


def abandoned_request(server, patience: float) -> threading.Thread:
    """A request far longer than `patience`, whose client gives up (disconnects) after `patience` seconds."""
    body = {"model": server.model_name, "prompt": "Once upon a time", "max_tokens": 30000, "temperature": 0,
            "ignore_eos": True}

    def run():
        try:
            httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=patience)
        except httpx.TimeoutException:
            pass

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_client_disconnect_frees_capacity(tiny_llama, tmp_path):
    server = start(tiny_llama, tmp_path / "server.log", "--max_num_seqs=2", "--max_model_len=32768")
    try:
        clients = [abandoned_request(server, patience=2) for _ in range(2)]
        wait_for_metric(server, "predictor_num_requests_running", 2)
        for client in clients:
            client.join()
        wait_for_metric(server, "predictor_num_requests_running", 0)
        assert metric(server, "predictor_kv_cache_usage_ratio") == 0
        # A full batch fits again, and is served in full.
        results = []
        threads = [threading.Thread(target=lambda: results.append(predict(server, {"max_new_tokens": 5})))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [r.status_code for r in results] == [200, 200]
        assert all(r.json()["predictions"][0]["usage"]["completion_tokens"] == 5 for r in results)
    finally:
        server.stop()


def held_stream(server, release: threading.Event) -> threading.Thread:
    """A streamed request far longer than the test, which its client drops once `release` is set: it holds its
    place (running or waiting) for as long as the test needs, whatever the machine's speed."""
    body = {"model": server.model_name, "prompt": "Once upon a time", "max_tokens": 30000, "temperature": 0,
            "ignore_eos": True, "stream": True}

    def run():
        with httpx.stream("POST", f"{server.url}/openai/v1/completions", json=body, timeout=120) as response:
            for _ in response.iter_lines():
                if release.is_set():
                    break

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def embed(server, inputs: int) -> httpx.Response:
    body = {"model": server.model_name, "input": ["Once upon a time"] * inputs}
    return httpx.post(f"{server.url}/openai/v1/embeddings", json=body, timeout=60)


def predict_instances(server, count: int) -> httpx.Response:
    body = {"instances": [{"prompt": "Once upon a time", "parameters": {"max_new_tokens": 4}}] * count}
    return httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=body, timeout=120)


def test_full_queue_answers_429_and_server_stays_up(tiny_llama, tmp_path):
    """One max_queue for generations and embedding inputs; a request's instances or inputs are queued all
    together or not at all, and more than max_queue of them is a 400 (a 429 could never succeed)."""
    server = start(tiny_llama, tmp_path / "server.log", "--max_num_seqs=1", "--max_queue=2",
                   "--max_model_len=32768")
    release = threading.Event()
    last = None
    try:
        clients = [held_stream(server, release)]
        # Admitted, and its first step done: until then it still counts as waiting.
        wait_for_metrics(server, lambda running, waiting: (running, waiting) == (1, 0),
                         "predictor_num_requests_running", "predictor_num_requests_waiting")
        clients.append(held_stream(server, release))
        last = held_request(server, "/openai/v1/completions", {"model": server.model_name, "prompt": "Once",
                                                               "max_tokens": 30000, "ignore_eos": True})
        wait_for_metric(server, "predictor_num_requests_waiting", 2)
        for refused in (predict(server, {"max_new_tokens": 4}), embed(server, 1)):
            assert refused.status_code == 429, refused.text
            assert "max_queue" in refused.text and refused.headers["retry-after"]
        too_many = predict_instances(server, 3)
        assert too_many.status_code == 400 and "instances: 3 items exceed max_queue (2)" in too_many.text
        too_many = embed(server, 3)
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "input"
        assert "exceed max_queue (2)" in too_many.text

        last.close()  # one place free: two instances or inputs still do not fit, and take nothing
        wait_for_metric(server, "predictor_num_requests_waiting", 1)
        for refused in (predict_instances(server, 2), embed(server, 2)):
            assert refused.status_code == 429, refused.text
        assert metric(server, "predictor_num_requests_waiting") == 1
        assert embed(server, 1).status_code == 200  # a small request gets the free place

        release.set()
        for client in clients:
            client.join()
        wait_for_metric(server, "predictor_num_requests_running", 0)
        accepted = predict_instances(server, 2)
        assert accepted.status_code == 200 and len(accepted.json()["predictions"]) == 2
    finally:
        release.set()
        if last is not None:
            last.close()
        server.stop()


def test_readiness_is_503_while_loading_then_200(tiny_llama, tmp_path):
    """Full weight verification of a large file keeps the model loading long enough to observe."""
    import shutil

    from predictor.tools.manifest import write_manifest

    model_dir = shutil.copytree(tiny_llama, tmp_path / "model")
    with open(model_dir / "extra-weights.bin.padding", "wb") as padding:
        padding.truncate(1 << 30)  # sparse: instant to make, ~1 s to hash
    write_manifest(model_dir)
    server = launch(model_dir, tmp_path / "server.log", "--verify_weights=full")
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 200 not in seen:
            try:
                seen.append(httpx.get(f"{server.url}/v1/models/tiny", timeout=5).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        wait_ready(server)
    finally:
        server.stop()
    assert 503 in seen and seen[-1] == 200
    assert set(seen) <= {503, 200}
