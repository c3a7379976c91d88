"""Embeddings over HTTP: parity with the model's own mean-pooled hidden states, the openai client, bad inputs, and
a burst of embeddings whose clients left: dropped, and never in a completion's way."""

from __future__ import annotations

import asyncio
import base64
import struct

import httpx
import jsonschema_rs
import openai
import pytest
import torch
from models import make_llama
from servers import held_request, metrics, start, wait_for_metrics

TEXTS = ["What is the capital of France?", "Once upon a time", "a"]


def reference_embedding(reference, token_ids: list[int]) -> list[float]:
    """The last hidden state of the plain transformers model, mean-pooled and L2-normalised, in fp32."""
    model, _ = reference
    with torch.inference_mode():
        hidden = model.model(torch.tensor([token_ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.float().mean(0), dim=0).tolist()


def assert_close(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    assert torch.allclose(torch.tensor(actual), torch.tensor(expected), atol=1e-5, rtol=1e-4)


def embed(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/openai/v1/embeddings", json={"model": server.model_name, **body}, timeout=60)


def test_embeddings_match_the_models_hidden_states(server, reference):
    _, tokenizer = reference
    response = embed(server, {"input": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    prompt_ids = [tokenizer(text).input_ids for text in TEXTS]
    for item, ids in zip(body["data"], prompt_ids):
        assert_close(item["embedding"], reference_embedding(reference, ids))
    assert body["usage"] == {"prompt_tokens": sum(map(len, prompt_ids)), "total_tokens": sum(map(len, prompt_ids))}


def test_token_id_inputs_embed_the_ids_as_given(server, reference):
    ids = [[1, 450, 7483], [1, 29871, 29896, 29892]]
    response = embed(server, {"input": ids})
    assert response.status_code == 200, response.text
    for item, token_ids in zip(response.json()["data"], ids):
        assert_close(item["embedding"], reference_embedding(reference, token_ids))
    single = embed(server, {"input": ids[0]})
    assert single.status_code == 200, single.text
    assert_close(single.json()["data"][0]["embedding"], reference_embedding(reference, ids[0]))


def test_base64_encoding_round_trips(server):
    as_floats = embed(server, {"input": TEXTS[0]}).json()["data"][0]["embedding"]
    response = embed(server, {"input": TEXTS[0], "encoding_format": "base64"})
    assert response.status_code == 200, response.text
    packed = base64.b64decode(response.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(as_floats, abs=1e-7)


def test_the_openapi_document_describes_both_encodings(server):
    """Found by the fuzz test: the document gave only the float form, so a base64 answer broke it."""
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    answer = document["paths"]["/openai/v1/embeddings"]["post"]["responses"]["200"]["content"]["application/json"]
    validator = jsonschema_rs.validator_for({**answer["schema"], "components": document["components"]})
    for encoding in ("float", "base64"):
        response = embed(server, {"input": TEXTS[0], "encoding_format": encoding})
        assert response.status_code == 200 and validator.is_valid(response.json()), encoding


def test_the_openai_client_parses_the_response(server, reference):
    _, tokenizer = reference
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="x")
    # The client asks for base64 when no format is given and decodes it itself.
    result = client.embeddings.create(model=server.model_name, input=TEXTS[:2])
    assert [d.index for d in result.data] == [0, 1]
    for item, text in zip(result.data, TEXTS):
        assert_close(item.embedding, reference_embedding(reference, tokenizer(text).input_ids))
    as_floats = client.embeddings.create(model=server.model_name, input=TEXTS[0], encoding_format="float")
    assert_close(as_floats.data[0].embedding, result.data[0].embedding)
    assert result.model == server.model_name and result.usage.prompt_tokens > 0

    async def create_async():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x") as async_client:
            return await async_client.embeddings.create(model=server.model_name, input=TEXTS[2])

    expected = reference_embedding(reference, tokenizer(TEXTS[2]).input_ids)
    assert_close(asyncio.run(create_async()).data[0].embedding, expected)


def test_llm_api_seed_example(server, reference):
    _, tokenizer = reference
    # llm-api's README, verbatim: POST /embeddings {"text": ...}; the answer is the bare vector.
    response = httpx.post(f"{server.url}/embeddings", json={
        "text": "What is the capital of France?"
    }, timeout=60)
    assert response.status_code == 200, response.text
    vector = response.json()
    assert isinstance(vector, list) and all(isinstance(x, float) for x in vector)
    assert_close(vector, reference_embedding(reference, tokenizer("What is the capital of France?").input_ids))


HIDDEN_SIZE = 64  # TINY_LLAMA's
BAD_INPUTS = [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[]]}, "input[0]"),
    ({"input": ["fine", ""]}, "input[1]"),
    ({"input": ["x"] * 257}, "256"),
    ({"input": "word " * 600}, "max_model_len"),
    ({"input": [1, 32000]}, "vocabulary"),
    ({"input": [-1]}, "vocabulary"),
    ({"input": 3}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "model": "other"}, "model"),
    ({"input": "x", "truncate": True}, "truncate"),
]


@pytest.mark.parametrize(("body", "named"), BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_inputs_are_4xx_naming_the_field(server, body, named):
    response = embed(server, body)
    assert 400 <= response.status_code < 500, response.text
    assert named in response.text


def test_bad_llm_api_inputs_and_the_server_still_answers(server):
    for body in [{"text": ""}, {"text": 5}, {}, {"text": "x", "params": {}}]:
        response = httpx.post(f"{server.url}/embeddings", json=body, timeout=30)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert "text" in response.text or "params" in response.text
    assert embed(server, {"input": "still here", "dimensions": HIDDEN_SIZE}).status_code == 200


COMPUTED = 'predictor_embedding_prompts_total{outcome="computed"}'
CANCELLED = 'predictor_embedding_prompts_total{outcome="cancelled"}'
WAITING = "predictor_num_requests_waiting"


def test_left_embeddings_are_dropped_and_a_completion_overtakes_them(tokenizer_dir, tmp_path):
    """The issue's burst: 10 requests of 16 x 500 tokens, on a model deeper and wider than the tiny one so that
    the burst is many times the work of getting the completion in; one prompt per embedding forward."""
    model_dir = make_llama(tmp_path / "wider", tokenizer_dir, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=4)
    server = start(model_dir, tmp_path / "server.log", "--max_model_len=512", "--max_prefill_tokens=512")
    clients = []
    try:
        body = {"model": server.model_name, "input": [[100 + i] * 500 for i in range(16)]}
        clients = [held_request(server, "/openai/v1/embeddings", body) for _ in range(10)]
        wait_for_metrics(server, lambda waiting, computed: waiting + computed == 160, WAITING, COMPUTED)  # all queued
        completion = httpx.post(f"{server.url}/openai/v1/completions", timeout=60, json={
            "model": server.model_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
        assert completion.status_code == 200, completion.text
        (computed,) = metrics(server, COMPUTED, absent=0)
        assert computed < 160, "the completion waited for every embedding"
        for sock in clients:
            sock.close()
        computed, cancelled = wait_for_metrics(server, lambda computed, cancelled: computed + cancelled == 160,
                                         COMPUTED, CANCELLED)
        assert cancelled > 0 and computed < 160
        wait_for_metrics(server, lambda left: left == 10,
                             'predictor_http_requests_total{method="POST",route="/openai/v1/embeddings",status="499"}')
        assert metrics(server, WAITING) == [0]
        assert httpx.post(f"{server.url}/openai/v1/embeddings", timeout=60, json={
            "model": server.model_name, "input": "still served"}).status_code == 200
    finally:
        for sock in clients:
            sock.close()
        server.stop()
