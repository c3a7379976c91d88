"""Generation through the real server over HTTP: parity with model.generate, sampling, stops, finish reasons."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from models import greedy_reference

PROMPTS = [
    "Hello",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Translate to German: the weather is nice today and we",
    "Q: What is the meaning of life? A:",
    "In 1492, Columbus sailed the ocean blue. In 1776, the United States declared independence. In 1969,",
    "a",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore",
]


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(url, json=body) for body in bodies))


def test_openai_completions_match_generate_under_concurrency(server, reference):
    bodies = [{"model": server.model_name, "prompt": p, "max_tokens": 12 + i, "temperature": 0}
              for i, p in enumerate(PROMPTS)]
    responses = asyncio.run(_post_all(f"{server.url}/openai/v1/completions", bodies))
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["text"] == greedy_reference(reference, body["prompt"], body["max_tokens"])
        assert choice["finish_reason"] in ("length", "stop")


def test_the_cpu_engine_keeps_the_memory_its_steps_free(server):
    """predictor/host_memory.py, set in the engine process once the model is loaded: the parity tests here run
    with it."""
    assert "host memory: freed blocks below 32 MiB stay in malloc's heap for the next step" in server.output()


def test_v1_predict_matches_generate_under_concurrency(server, reference):
    instances = [{"prompt": p, "parameters": {"max_new_tokens": 20 - i, "temperature": 0}}
                 for i, p in enumerate(PROMPTS)]
    bodies = [{"instances": [instance]} for instance in instances]
    responses = asyncio.run(_post_all(f"{server.url}/v1/models/{server.model_name}:predict", bodies))
    for instance, response in zip(instances, responses):
        assert response.status_code == 200, response.text
        prediction = response.json()["predictions"][0]
        expected = greedy_reference(reference, instance["prompt"], instance["parameters"]["max_new_tokens"])
        assert prediction["generated_text"] == expected


def test_v2_infer_text_input(server, reference):
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": PROMPTS[:2]}],
            "parameters": {"max_new_tokens": 6, "temperature": 0}}
    response = httpx.post(f"{server.url}/v2/models/{server.model_name}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["name"] == "text_output"
    assert output["data"] == [greedy_reference(reference, p, 6) for p in PROMPTS[:2]]


def predict(server, parameters: dict, prompt: str = "Once upon a time") -> dict:
    body = {"instances": [{"prompt": prompt, "parameters": parameters}]}
    response = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def test_seeded_sampling_is_reproducible(server):
    parameters = {"max_new_tokens": 24, "temperature": 0.9, "top_k": 50, "top_p": 0.95, "typical_p": 0.9,
                  "repetition_penalty": 1.2, "seed": 1234}
    first, second = predict(server, parameters), predict(server, parameters)
    assert first["generated_text"] == second["generated_text"]
    other = predict(server, {**parameters, "seed": 4321})
    assert other["generated_text"] != first["generated_text"]


def test_stop_string_ends_text_before_it(server, reference):
    full = greedy_reference(reference, "Once upon a time", 30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    result = predict(server, {"max_new_tokens": 30, "temperature": 0, "stop": [stop]})
    assert result["finish_reason"] == "stop"
    assert result["generated_text"] == full[: full.index(stop)]


def test_stop_token_id_and_length_finish_reasons(server, reference):
    model, tokenizer = reference
    greedy = predict(server, {"max_new_tokens": 8, "temperature": 0})
    assert greedy["finish_reason"] == "length" and greedy["usage"]["completion_tokens"] == 8
    prompt_ids = tokenizer("Once upon a time").input_ids
    import torch

    generated = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False,
                               pad_token_id=0)[0, len(prompt_ids):].tolist()
    stopped = predict(server, {"max_new_tokens": 8, "temperature": 0, "stop_token_ids": [generated[3]]})
    assert stopped["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == generated.index(generated[3]) + 1
    assert greedy["generated_text"].startswith(stopped["generated_text"])
    at_least = predict(server, {"max_new_tokens": 8, "temperature": 0, "stop_token_ids": [generated[0]],
                                "min_new_tokens": 3})
    assert at_least["usage"]["completion_tokens"] >= 3


def test_eos_finishes_with_stop(tiny_llama, tmp_path, reference):
    """A model whose EOS is the token it greedily produces third stops there with finish_reason stop."""
    import json
    import shutil

    from servers import start

    model, tokenizer = reference
    prompt = "Once upon a time"
    ids = tokenizer(prompt).input_ids
    import torch

    generated = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(ids):].tolist()
    eos_dir = shutil.copytree(tiny_llama, tmp_path / "eos-model")
    (eos_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": generated[2], "bos_token_id": 1}))
    eos_server = start(eos_dir, tmp_path / "eos.log")
    try:
        result = predict(eos_server, {"max_new_tokens": 20, "temperature": 0}, prompt)
    finally:
        eos_server.stop()
    assert result["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == generated.index(generated[2]) + 1


def test_chat_messages_use_the_chat_template(server, reference):
    _, tokenizer = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    body = {"instances": [{"messages": messages, "parameters": {"max_new_tokens": 5, "temperature": 0}}]}
    response = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=body, timeout=60)
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["predictions"][0]["usage"]["prompt_tokens"]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]")
    assert prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)


@pytest.mark.parametrize(
    "parameters, field",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"typical_p": 2}, "typical_p"),
        ({"seed": -3}, "seed"),
        ({"no_such_parameter": 1}, "no_such_parameter"),
        ({"max_new_tokens": 100000}, "max_new_tokens"),
        ({"structured_output": {"schema": {}}}, "structured_output.json_schema: Field required"),
        ({"structured_output": {"json_schema": {"type": "objectx"}}}, "parameters.structured_output: unusable"),
    ],
)
def test_invalid_parameters_are_400_naming_the_field(server, parameters, field):
    body = {"instances": [{"prompt": "Hi", "parameters": parameters}]}
    response = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]


def test_too_long_prompt_is_400(server):
    prompt = "hello " * 600  # > max_model_len 512 tokens
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 4}
    response = httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert "max_model_len" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "tiny", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "tiny", "prompt": "x", "n": 17}, "n"),
        ({"model": "other", "prompt": "x"}, "model"),
        ({"model": "tiny"}, "prompt"),
    ],
)
def test_invalid_openai_requests_are_4xx(server, body, field):
    response = httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    assert field in response.text


def test_openai_client_parses_completions_chat_and_models(server, reference):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused")
    completion = client.completions.create(model=server.model_name, prompt="Hello", max_tokens=7, temperature=0)
    assert completion.choices[0].text == greedy_reference(reference, "Hello", 7)
    assert completion.usage.completion_tokens <= 7
    chat = client.chat.completions.create(model=server.model_name, max_tokens=5, temperature=0,
                                          messages=[{"role": "user", "content": "Hi there"}])
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list()] == [server.model_name]
    kserve_list = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert kserve_list == {"models": [server.model_name]}
