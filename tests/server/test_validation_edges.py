"""Edge values no route may accept silently: each is a 400 naming the field in the route's own words (OpenAI's
field names on the OpenAI routes, never the engine's), and the API key's scheme is matched in any case."""

from __future__ import annotations

import httpx
import pytest
from servers import start

API_KEY = "edge-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 512
VOCAB = 32000  # the tiny Llama's
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    running = start(tiny_llama, tmp_path_factory.mktemp("logs") / "server.log", "--max_num_seqs=4",
                    f"--max_model_len={MAX_MODEL_LEN}", "--chat_template=llama-2", f"--api_key={API_KEY}")
    yield running
    running.stop()


def completion(**fields) -> dict:
    return {"model": "tiny", "prompt": "Hi", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": CHAT, "max_tokens": 2, **fields}


def v1(prompt="Hi", **parameters) -> dict:
    return {"instances": [{"prompt": prompt, "parameters": {"max_new_tokens": 2, **parameters}}]}


def v2(data, **parameters) -> dict:
    return {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": data}],
            "parameters": {"max_new_tokens": 2, **parameters}}


COMPLETIONS, CHATS = "/openai/v1/completions", "/openai/v1/chat/completions"
V1, V2, WORKER = "/v1/models/tiny:predict", "/v2/models/tiny/infer", "/worker_generate"

# name: (path, body, the field the 400 names, words its message must hold)
EDGES = {
    "min_tokens above max_tokens": (COMPLETIONS, completion(min_tokens=5), "min_tokens", "<= max_tokens (2)"),
    "chat min_tokens above max_tokens": (CHATS, chat(min_tokens=5), "min_tokens", "<= max_tokens (2)"),
    "chat min_tokens above the default max_tokens": (
        CHATS, {"model": "tiny", "messages": CHAT, "min_tokens": MAX_MODEL_LEN}, "min_tokens", "<= max_tokens"),
    "chat min_tokens above max_completion_tokens": (
        CHATS, {"model": "tiny", "messages": CHAT, "max_completion_tokens": 2, "min_tokens": 5}, "min_tokens",
        "<= max_completion_tokens (2)"),
    "v1 min_new_tokens above max_new_tokens": (V1, v1(min_new_tokens=5), "min_new_tokens", "<= max_new_tokens (2)"),
    "v2 min_new_tokens above max_new_tokens": (V2, v2(["Hi"], min_new_tokens=5), "min_new_tokens",
                                               "<= max_new_tokens (2)"),
    "openai stop token past the vocabulary": (COMPLETIONS, completion(stop_token_ids=[1, VOCAB]), "stop_token_ids.1",
                                              f"< {VOCAB}"),
    "chat stop token past the vocabulary": (CHATS, chat(stop_token_ids=[VOCAB + 7]), "stop_token_ids.0",
                                            f"< {VOCAB}"),
    "v1 stop token past the vocabulary": (V1, v1(stop_token_ids=[VOCAB]), "stop_token_ids.0", f"< {VOCAB}"),
    "worker stop token past the vocabulary": (WORKER, {"prompt": "Hi", "max_new_tokens": 2,
                                                       "stop_token_ids": [VOCAB]}, "stop_token_ids.0", f"< {VOCAB}"),
    "token id true": (COMPLETIONS, completion(prompt=[1, True]), "prompt", "not true"),
    "token id 1.0": (COMPLETIONS, completion(prompt=[1.0, 5]), "prompt", "not 1.0"),
    "nested token id true": (COMPLETIONS, completion(prompt=[[1, 5], [True]]), "prompt", "not true"),
    "embedding token id 1.0": ("/openai/v1/embeddings", {"model": "tiny", "input": [1.0]}, "input", "not 1.0"),
    "stop token id true": (COMPLETIONS, completion(stop_token_ids=[True]), "stop_token_ids.0", "valid integer"),
    "v1 stop token id 1.0": (V1, v1(stop_token_ids=[1.0]), "stop_token_ids.0", "valid integer"),
    "worker stop token id true": (WORKER, {"prompt": "Hi", "stop_token_ids": [True]}, "stop_token_ids.0",
                                  "valid integer"),
    "falcon eos_token_id true": ("/chat", {"prompt": "Hi", "max_length": 8, "eos_token_id": True},
                                 "falcon.eos_token_id",  # the Kaito body union names its form
                                 "valid integer"),
    "v1 empty prompt": (V1, v1(prompt=""), "instances.0.prompt", "must not be empty"),
    "v1 no instances": (V1, {"instances": []}, "instances", "at least one"),
    "v2 empty prompt": (V2, v2(["Hi", ""]), "inputs.0.data.1", "must not be empty"),
    "v2 no prompts": (V2, v2([]), "inputs.0.data", "non-empty list"),
    "v2 data an object": (V2, v2({"a": 1}), "inputs.0.data", "valid list"),
    "v2 data a number": (V2, v2([7]), "inputs.0.data.0", "must be a string"),
    "worker empty prompt": (WORKER, {"prompt": "", "max_new_tokens": 2}, "prompt", "must not be empty"),
    "worker empty prompt, streamed": ("/worker_generate_stream", {"prompt": ""}, "prompt", "must not be empty"),
    "max_tokens past max_model_len": (COMPLETIONS, completion(max_tokens=MAX_MODEL_LEN), "max_tokens",
                                      f"+ max_tokens ({MAX_MODEL_LEN}) must be <= max_model_len"),
    "chat max_completion_tokens past max_model_len": (
        CHATS, {"model": "tiny", "messages": CHAT, "max_completion_tokens": MAX_MODEL_LEN}, "max_completion_tokens",
        f"+ max_completion_tokens ({MAX_MODEL_LEN}) must be <= max_model_len"),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_an_edge_value_is_a_400_naming_its_field(server, name):
    path, body, field, words = EDGES[name]
    response = httpx.post(server.url + path, json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if isinstance(error, str):  # KServe's V1/V2 shape
        assert error.startswith(f"{field}: "), error
        assert words in error, error
    else:
        assert error["param"] == field and error["message"].startswith(f"{field}: "), error
        assert words in error["message"], error
    if path.startswith("/openai/"):  # the engine's names never reach an OpenAI client
        assert "new_tokens" not in response.text, response.text


def test_the_bounds_themselves_are_accepted(server):
    """The edges' neighbours are served: min_tokens == max_tokens, the last token id, integer token ids."""
    for path, body in [
        (COMPLETIONS, completion(min_tokens=2, stop_token_ids=[VOCAB - 1], prompt=[1, 15043])),
        (V1, v1(min_new_tokens=2, stop_token_ids=[VOCAB - 1])),
        (V2, v2(["Hi", " "])),
    ]:
        response = httpx.post(server.url + path, json=body, headers=AUTH, timeout=30)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("header, status", [
    (f"Bearer {API_KEY}", 200), (f"bearer {API_KEY}", 200), (f"BEARER {API_KEY}", 200), (f"beaRer  {API_KEY}", 200),
    ("Bearer wrong", 401), (f"Basic {API_KEY}", 401), (API_KEY, 401), (f"Bearer{API_KEY}", 401),
])
def test_the_bearer_scheme_is_matched_in_any_case(server, header, status):
    response = httpx.post(server.url + COMPLETIONS, json=completion(), headers={"Authorization": header}, timeout=30)
    assert response.status_code == status, response.text
