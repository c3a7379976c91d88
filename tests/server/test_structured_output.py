"""response_format through the official openai client against the real server: json_object and json_schema by
constrained decoding, beside unconstrained requests that keep model.generate's greedy text, and the 400s.

The test model has random weights: left free it writes gibberish, so JSON that parses (and validates) is the
grammar's doing. Left to itself it would never close a string of its own; the budget's closing makes every
answer finish ("stop") within max_tokens, and what finishes parses.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from models import greedy_reference
from pydantic import BaseModel, Field

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Reply in JSON"}]
REPLY_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 99},
                   "tag": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "count", "tag"], "additionalProperties": False,
}
REPLY_FORMAT = {"type": "json_schema", "json_schema": {"name": "reply", "schema": REPLY_SCHEMA, "strict": True}}


class Reply(BaseModel):
    ok: bool
    count: int = Field(ge=0, le=99)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)


def chat(client, server, **kwargs):
    return client.chat.completions.create(model=server.model_name, messages=MESSAGES, **kwargs)


def test_json_schema_output_validates_greedy_and_sampled(server, client):
    greedy = chat(client, server, max_tokens=64, temperature=0, response_format=REPLY_FORMAT).choices[0]
    assert greedy.finish_reason == "stop"
    jsonschema.validate(json.loads(greedy.message.content), REPLY_SCHEMA)
    sampled = chat(client, server, max_tokens=64, temperature=1.0, seed=11, n=6, response_format=REPLY_FORMAT)
    for choice in sampled.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), REPLY_SCHEMA)
    assert len({c.message.content for c in sampled.choices}) > 1


def test_seeded_json_is_reproducible(server, client):
    def once() -> list[str]:
        response = chat(client, server, max_tokens=64, temperature=1.0, seed=5, n=3, response_format=REPLY_FORMAT)
        return [c.message.content for c in sorted(response.choices, key=lambda c: c.index)]

    assert once() == once()


@pytest.mark.parametrize("max_tokens", [16, 64])
def test_json_object_output_finishes_within_max_tokens_and_parses(server, client, max_tokens):
    greedy = chat(client, server, max_tokens=max_tokens, temperature=0, response_format={"type": "json_object"})
    sampled = chat(client, server, max_tokens=max_tokens, temperature=1.0, seed=0, n=8,
                   response_format={"type": "json_object"})
    for choice in greedy.choices + sampled.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


def test_a_free_string_field_finishes_within_max_tokens(server, client):
    """An unbounded string is the model's to end; this one never would, and is closed as the budget runs out."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for temperature, seed in ((0, None), (1.0, 1), (1.0, 2)):
        choice = chat(client, server, max_tokens=64, temperature=temperature, seed=seed,
                      response_format=response_format).choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_the_sdk_parse_helper_gets_its_pydantic_model(server, client):
    completion = client.chat.completions.parse(model=server.model_name, messages=MESSAGES, max_tokens=64,
                                               temperature=0, response_format=Reply)
    assert isinstance(completion.choices[0].message.parsed, Reply)


def test_streamed_json_is_the_whole_one(server, client):
    whole = chat(client, server, max_tokens=64, temperature=0, response_format=REPLY_FORMAT).choices[0].message.content
    stream = chat(client, server, max_tokens=64, temperature=0, response_format=REPLY_FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


def test_completions_take_response_format_as_vllm_does(server, client):
    completion = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=64, temperature=0,
                                           extra_body={"response_format": REPLY_FORMAT})
    jsonschema.validate(json.loads(completion.choices[0].text), REPLY_SCHEMA)


def test_constrained_and_free_requests_together_keep_the_free_ones_exact(server, reference):
    """Constrained requests share the engine's steps with free ones; the free greedy ones still equal
    model.generate (the mask touches only its own rows)."""

    async def together():
        async_client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        free = [async_client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=24,
                                                temperature=0, extra_body={"ignore_eos": True}) for _ in range(3)]
        constrained = [async_client.chat.completions.create(
            model=server.model_name, messages=MESSAGES, max_tokens=64, temperature=1.0, seed=seed,
            response_format=REPLY_FORMAT) for seed in range(3)]
        return await asyncio.gather(*free, *constrained)

    results = asyncio.run(together())
    expected = greedy_reference(reference, PROMPT, 24)
    assert [r.choices[0].text for r in results[:3]] == [expected] * 3
    for response in results[3:]:
        jsonschema.validate(json.loads(response.choices[0].message.content), REPLY_SCHEMA)


def test_json_from_the_prefix_cache_is_the_json_computed_afresh(server, client):
    for jars, params in ((3, {"temperature": 0}), (5, {"temperature": 1.0, "seed": 3})):
        system = "You keep an inventory. " + " ".join(f"Shelf {i} holds {i * jars} jars;" for i in range(30))
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Reply in JSON"}]
        first, again = (client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=64,
                                                       response_format=REPLY_FORMAT, **params) for _ in range(2))
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens_details.cached_tokens
        jsonschema.validate(json.loads(first.choices[0].message.content), REPLY_SCHEMA)


def test_text_format_changes_nothing(server, client, reference):
    completion = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=8, temperature=0,
                                           extra_body={"response_format": {"type": "text"}})
    assert completion.choices[0].text == greedy_reference(reference, PROMPT, 8)


BAD_FORMATS = [
    ({"type": "yaml"}, "response_format.type", "'json_object'"),
    ({"type": "json_schema"}, "response_format", "json_schema"),
    ({"type": "json_object", "json_schema": {"name": "a"}}, "response_format", "json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name",
     "required"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {"type": "object"}}},
     "response_format.json_schema.name", "pattern"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "objectx"}}}, "response_format",
     'unusable JSON schema: Unsupported type "objectx"'),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"$ref": "#/nowhere"}}}, "response_format",
     "unusable JSON schema"),
    ({"type": "json_object", "schema": {}}, "response_format.schema", "Extra inputs"),
]


@pytest.mark.parametrize("response_format, field, mentioned", BAD_FORMATS)
def test_bad_response_formats_are_400_naming_the_field(server, response_format, field, mentioned):
    body = {"model": server.model_name, "messages": MESSAGES, "response_format": response_format}
    response = httpx.post(f"{server.url}/openai/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: ") and mentioned in error["message"]


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("tool_choice", "required"), ("functions", [{"name": "f"}])])
def test_tool_calling_is_refused_with_a_clear_400(server, field, value):
    body = {"model": server.model_name, "messages": MESSAGES, field: value}
    response = httpx.post(f"{server.url}/openai/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and "tool calling is not supported" in error["message"]


def test_tool_choice_none_and_parallel_tool_calls_are_accepted(server, client):
    response = chat(client, server, max_tokens=2, tool_choice="none", parallel_tool_calls=False)
    assert response.choices[0].finish_reason in ("stop", "length")


def slow_schema(seed: int, properties: int = 800) -> dict:
    """Optional properties: xgrammar's compile time grows with the square of their number (half a second on a quiet
    core here), while the schema stays within max_schema_bytes (26 KB of 32 KiB)."""
    return {"type": "object", "properties": {f"k{seed}_{i}": {"type": "integer"} for i in range(properties)}}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


SLOW_SCHEMAS = 12


def test_probes_and_other_requests_do_not_wait_behind_grammar_compiles(server):
    """The issue: 8 large schemas compiling filled the shared worker threads, /healthz answered 503 and a
    completion took 48 s. Grammars compile on threads of their own now: while they do, probes answer, a
    completion is tokenized and served, and a schema past max_schema_bytes is refused at once."""
    answered = []  # (what, status), in the order the answers came

    def post(what: str, path: str, body: dict) -> None:
        response = httpx.post(server.url + path, json={"model": server.model_name, **body}, timeout=120)
        answered.append((what, response.status_code, response.text))

    schemas = [threading.Thread(target=post, args=("schema", "/openai/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 1, "response_format": schema_format(slow_schema(seed))}))
        for seed in range(SLOW_SCHEMAS)]
    for thread in schemas:
        thread.start()
    time.sleep(0.2)  # let them reach the server first: the requests below must come after them
    post("completion", "/openai/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    too_big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}
    post("too big", "/openai/v1/chat/completions", {"messages": MESSAGES, "response_format": schema_format(too_big)})
    probe = httpx.get(f"{server.url}/healthz", timeout=30)
    answered.append(("healthz", probe.status_code, probe.text))
    for thread in schemas:
        thread.join()

    # Twelve compiles take seconds on the grammar threads; the other three are answered while most are still going.
    whats = [what for what, _, _ in answered]
    quick_answered_by = max(whats.index(what) for what in ("completion", "too big", "healthz"))
    assert whats[quick_answered_by + 1:].count("schema") >= SLOW_SCHEMAS // 2, whats
    statuses = {what: (status, text) for what, status, text in answered}
    assert statuses["completion"][0] == 200 and statuses["healthz"] == (200, '{"status":"Healthy"}')
    status, text = statuses["too big"]
    assert status == 400 and json.loads(text)["error"]["param"] == "response_format"
    assert "more than max_schema_bytes (32768)" in text
    assert [status for what, status, _ in answered if what == "schema"] == [200] * SLOW_SCHEMAS
    v1 = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", timeout=30, json={"instances": [
        {"prompt": PROMPT, "parameters": {"structured_output": {"json_schema": too_big}}}]})
    assert v1.status_code == 400, v1.text
    assert v1.json()["error"].startswith("instances.0.parameters.structured_output: the JSON schema is ")
