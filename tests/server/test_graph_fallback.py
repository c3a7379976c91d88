"""A server whose CUDA-graph capture fails at start serves eagerly instead of exiting: one log line says why,
readiness answers 200, greedy text equals generate's. The failure is the test fault injection, which makes the
capture run on the CPU too, up to where it would record."""

from __future__ import annotations

import httpx
from models import greedy_reference
from servers import predictor_env, start

from predictor.engine.cuda_graphs import FAIL_CAPTURE_ENV

PROMPTS = ["Hello", "The capital of France is", "Once upon a time"]


def test_a_failed_capture_is_one_log_line_and_the_server_serves_eagerly(tiny_llama, reference, tmp_path):
    server = start(tiny_llama, tmp_path / "server.log", "--max_num_seqs=4", "--max_model_len=256",
                   env=predictor_env(**{FAIL_CAPTURE_ENV: "1"}))
    try:
        lines = [line for line in server.output().splitlines() if "CUDA graphs off:" in line]
        assert len(lines) == 1, server.output()
        assert lines[0].endswith("CUDA graphs off: CaptureFailed: capturing the decode graph of batch size 4 "
                                 f"failed: RuntimeError: {FAIL_CAPTURE_ENV}=1 (test fault injection)")
        assert httpx.get(f"{server.url}/v1/models/{server.model_name}", timeout=10).status_code == 200
        for prompt in PROMPTS:
            response = httpx.post(f"{server.url}/openai/v1/completions", timeout=60, json={
                "model": server.model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == greedy_reference(reference, prompt, 8)
    finally:
        server.stop()
