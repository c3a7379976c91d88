"""FastChat worker routes over HTTP: greedy parity, NUL-delimited streaming, echo, chat, disconnects, bad inputs."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from models import greedy_reference
from servers import metric, wait_for_metric

PROMPT = "Once upon a time"


def generate(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/worker_generate", json=body, timeout=60)


def stream_chunks(server, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/worker_generate_stream", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        raw = response.read()
    assert raw.endswith(b"\0")
    return [json.loads(part) for part in raw.split(b"\0")[:-1]]


def greedy_after_ids(reference, prompt_ids: list[int], max_new_tokens: int) -> str:
    """greedy_reference for a prompt given as token ids: the text after the prompt's, decoded in context."""
    model, tokenizer = reference
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    return tokenizer.decode(out[0], skip_special_tokens=True)[len(head):]


def test_greedy_generate_matches_model_generate(server, reference):
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 12, "echo": False}
    response = generate(server, body)
    assert response.status_code == 200, response.text
    output = response.json()
    assert output["text"] == greedy_reference(reference, PROMPT, 12)
    assert output["error_code"] == 0
    assert output["finish_reason"] in ("length", "stop")
    usage = output["usage"]
    assert usage["prompt_tokens"] == len(reference[1](PROMPT).input_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_fastchat_near_zero_temperature_is_greedy_and_echo_is_the_default(server, reference):
    output = generate(server, {"prompt": PROMPT, "temperature": 1e-6, "max_new_tokens": 8}).json()
    assert output["text"] == PROMPT + greedy_reference(reference, PROMPT, 8)


def test_stream_chunks_are_cumulative_and_end_with_the_full_text(server, reference):
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 16, "echo": False}
    chunks = stream_chunks(server, body)
    texts = [c["text"] for c in chunks]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert all(c["error_code"] == 0 for c in chunks)
    assert [c["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["finish_reason"] in ("length", "stop")
    assert texts[-1] == generate(server, body).json()["text"] == greedy_reference(reference, PROMPT, 16)


def test_echo_prefixes_the_prompt_in_the_stream_too(server):
    chunks = stream_chunks(server, {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 4, "echo": True})
    assert all(c["text"].startswith(PROMPT) for c in chunks)
    plain = generate(server, {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 4, "echo": False}).json()
    assert chunks[-1]["text"] == PROMPT + plain["text"]


def test_llm_ops_seed_chat_example(server, reference):
    # LLM Ops' non-streaming example, body verbatim (its "user"/"ai" roles and "text" fields).
    body = {
        "model_identifier": "Llama-2-7b-chat",
        "messages": [
            {
                "role": "user",
                "text": "Hellow!"
            },
            {
                "role": "ai",
                "text": "Hey! How can I help you today?"
            },
            {
                "role": "user",
                "text": "Tell me a short funny joke."
            }
        ],
        "system_message": "The following is a friendly conversation between a human and an AI.",
        "temperature": 0.7,
        "top_p": 0.9,
        "echo": False,
        "generation_mode": "chat"
    }
    response = generate(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["error_code"] == 0

    # The same dialog greedily equals model.generate on the chat template's rendering of it.
    greedy = generate(server, {**body, "temperature": 0, "max_new_tokens": 8}).json()
    _, tokenizer = reference
    messages = [{"role": "system", "content": body["system_message"]}] + [
        {"role": "assistant" if m["role"] == "ai" else "user", "content": m["text"]} for m in body["messages"]
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert greedy["text"] == greedy_after_ids(reference, tokenizer(rendered, add_special_tokens=False).input_ids, 8)


def test_llm_ops_seed_streaming_completion_example(server):
    # LLM Ops' streaming example, body verbatim: a completion with a system message.
    chunks = stream_chunks(server, {
        "model_identifier": "Llama-2-7b-chat",
        "prompt": "Hellow! Can you tell me a joke?",
        "system_message": "The following is a friendly conversation between a human and an AI.",
        "temperature": 0.7,
        "top_p": 0.9,
        "echo": False,
        "generation_mode": "completion"
    })
    assert chunks and chunks[-1]["finish_reason"] in ("length", "stop")
    assert all(c["error_code"] == 0 for c in chunks)


def test_stop_and_seed_are_honoured(server, reference):
    full = greedy_reference(reference, PROMPT, 20)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    output = generate(server, {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 20, "echo": False,
                               "stop": stop}).json()
    assert output["text"] == full[: full.index(stop)] and output["finish_reason"] == "stop"
    seeded = {"prompt": PROMPT, "temperature": 0.9, "top_k": -1, "max_new_tokens": 10, "seed": 7, "echo": False}
    assert generate(server, seeded).json()["text"] == generate(server, seeded).json()["text"]


def test_small_fastchat_routes(server, reference):
    count = httpx.post(f"{server.url}/count_token", json={"prompt": PROMPT}, timeout=10).json()
    assert count == {"count": len(reference[1](PROMPT).input_ids), "error_code": 0}
    assert httpx.post(f"{server.url}/model_details", timeout=10).json() == {"context_length": 512}
    status = httpx.post(f"{server.url}/worker_get_status", timeout=10).json()
    assert status["model_names"] == [server.model_name] and status["queue_length"] >= 0


BAD_BODIES = [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 100000}, "max_new_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": [""]}, "stop"),
    ({"n": 2}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"logprobs": 2}, "logprobs"),
    ({"model": "other"}, "model"),
    ({"generation_mode": "chat"}, "generation_mode"),
    ({"generation_mode": "beam"}, "generation_mode"),
    ({"messages": [{"role": "user", "text": "hi"}]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"prompt": None, "messages": [{"role": "robot", "text": "hi"}]}, "role"),
    ({"prompt": None, "messages": [{"role": "user"}]}, "messages[0]"),
    ({"prompt": None, "messages": []}, "messages"),
    ({"prompt": None, "messages": [{"role": "system", "text": "a"}, {"role": "user", "text": "b"}],
      "system_message": "c"}, "system_message"),
]


@pytest.mark.parametrize(("override", "named"), BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_bodies_are_4xx_naming_the_field(server, override, named):
    body = {"prompt": PROMPT, "max_new_tokens": 4, **override}
    body = {k: v for k, v in body.items() if not (k == "prompt" and v is None)}
    for route in ("worker_generate", "worker_generate_stream"):
        response = httpx.post(f"{server.url}/{route}", json=body, timeout=30)
        assert 400 <= response.status_code < 500, (route, response.text)
        assert named in response.text, response.text


def test_disconnect_mid_stream_cancels_the_generation(server):
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 490, "echo": False}
    cancelled_before = metric(server, 'predictor_request_finished_total{finished_reason="cancelled"}', absent=0)
    with httpx.stream("POST", f"{server.url}/worker_generate_stream", json=body, timeout=60) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        next(chunks)
        next(chunks)  # generating; now hang up
    wait_for_metric(server, "predictor_num_requests_running", 0, timeout=30)
    assert metric(server, 'predictor_request_finished_total{finished_reason="cancelled"}') == cancelled_before + 1
    assert generate(server, {"prompt": PROMPT, "max_new_tokens": 2}).status_code == 200


def test_openapi_documents_the_worker_and_embedding_routes(server):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    for path in ("/worker_generate", "/worker_generate_stream", "/openai/v1/embeddings", "/embeddings"):
        assert path in schema["paths"], path
    assert {"WorkerGenerateRequest", "WorkerOutput", "EmbeddingRequest", "EmbeddingsResponse"} <= set(
        schema["components"]["schemas"])
