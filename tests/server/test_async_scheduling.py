"""A server started with --async_scheduling (the next step built while this one runs): clients get what
model.generate gives (greedy, fp32) and what the synchronous server gives, through batching, stops mid-batch,
n > 1, a prefix-cache hit, a KV cache smaller than the batch, a client that leaves mid-stream, penalties, logprobs
and structured output in the same batch."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from models import greedy_reference
from servers import metric, start, wait_for_metrics

KV_BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 16  # K and V x 2 layers x 2 KV heads x head size 16 x fp32 x 16 tokens
PROMPTS = [
    "Hello",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Q: What is the meaning of life? A:",
    "In 1492, Columbus sailed the ocean blue. In 1776, the United States declared",
    "a",
]
REPLY_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
                "required": ["answer"], "additionalProperties": False}
REPLY_FORMAT = {"type": "json_schema", "json_schema": {"name": "reply", "schema": REPLY_SCHEMA}}


@pytest.fixture(scope="module")
def async_server(tiny_llama, tmp_path_factory):
    # 14 usable blocks (224 tokens) for 8 sequences that end at 296 tokens together: they cannot all be held
    running = start(tiny_llama, tmp_path_factory.mktemp("logs") / "async.log", "--async_scheduling",
                    "--max_num_seqs=8", "--max_queue=64", "--max_model_len=128",
                    f"--kv_cache_bytes={15 * KV_BLOCK_BYTES}")
    yield running
    running.stop()


def completions(server, bodies: list[dict]) -> list[dict]:
    async def post_all():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{server.url}/openai/v1/completions",
                                                      json={"model": server.model_name, **body}) for body in bodies))

    responses = asyncio.run(post_all())
    for response in responses:
        assert response.status_code == 200, response.text
    return [response.json() for response in responses]


def test_concurrent_completions_match_generate_under_a_small_kv_cache(async_server, reference):
    bodies = [{"prompt": p, "max_tokens": 12 + 4 * i, "temperature": 0} for i, p in enumerate(PROMPTS)]
    for body, result in zip(bodies, completions(async_server, bodies)):
        choice = result["choices"][0]
        assert choice["text"] == greedy_reference(reference, body["prompt"], body["max_tokens"])
        assert choice["finish_reason"] == "length"
    assert "async scheduling is on" in async_server.output()


def test_stop_tokens_mid_batch_n_choices_and_a_prefix_cache_hit(async_server, reference):
    model, tokenizer = reference
    stops = []
    for prompt in PROMPTS[:4]:
        ids = tokenizer(prompt).input_ids
        generated = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                   pad_token_id=0)[0, len(ids):].tolist()
        stops.append((generated, generated[2 + len(stops)]))
    bodies = [{"prompt": p, "max_tokens": 10, "temperature": 0, "stop_token_ids": [stop]}
              for p, (_, stop) in zip(PROMPTS, stops)]
    bodies.append({"prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0, "n": 3})
    results = completions(async_server, bodies)
    for (generated, stop), result in zip(stops, results):
        assert result["choices"][0]["finish_reason"] == "stop"
        assert result["usage"]["completion_tokens"] == generated.index(stop) + 1
    assert [c["text"] for c in results[-1]["choices"]] == [greedy_reference(reference, PROMPTS[2], 10)] * 3
    prompt = "A ledger about tides. " + " ".join(f"Line {i} notes the tides;" for i in range(8))
    first, again = (completions(async_server, [{"prompt": prompt, "max_tokens": 8, "temperature": 0}])[0]
                    for _ in range(2))
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == greedy_reference(reference, prompt, 8)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_penalties_logprobs_and_structured_output_give_what_the_synchronous_server_gives(async_server, server):
    bodies = [{"prompt": p, "max_tokens": 24, "temperature": 0, "frequency_penalty": 0.8, "presence_penalty": 0.5,
               "repetition_penalty": 1.3} for p in PROMPTS[:4]]
    bodies.append({"prompt": "Reply in JSON:", "max_tokens": 40, "temperature": 0, "response_format": REPLY_FORMAT})
    bodies.append({"prompt": PROMPTS[5], "max_tokens": 24, "temperature": 0, "logprobs": 2})
    got, expected = completions(async_server, bodies), completions(server, bodies)
    assert [r["choices"][0]["text"] for r in got] == [r["choices"][0]["text"] for r in expected]
    assert set(json.loads(got[4]["choices"][0]["text"])) == {"answer"}
    logprobs, expected_logprobs = got[5]["choices"][0]["logprobs"], expected[5]["choices"][0]["logprobs"]
    assert logprobs["tokens"] == expected_logprobs["tokens"] and len(logprobs["top_logprobs"]) == 24
    assert logprobs["token_logprobs"] == pytest.approx(expected_logprobs["token_logprobs"], abs=1e-4)


def test_a_client_leaving_mid_stream_frees_its_sequence_and_the_others_go_on(async_server, reference):
    cancelled = 'predictor_request_finished_total{finished_reason="cancelled"}'
    before = metric(async_server, cancelled, absent=0)
    body = {"model": async_server.model_name, "prompt": PROMPTS[3], "max_tokens": 100, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{async_server.url}/openai/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # one token streamed; then the client hangs up
    wait_for_metrics(async_server, lambda n, running, usage: n == before + 1 and running == 0 and usage == 0,
                     cancelled, "predictor_num_requests_running", "predictor_kv_cache_usage_ratio")
    result = completions(async_server, [{"prompt": PROMPTS[3], "max_tokens": 16, "temperature": 0}])[0]
    assert result["choices"][0]["text"] == greedy_reference(reference, PROMPTS[3], 16)
