"""The OpenAI-compatible routes through the official openai client: streaming, n, logprobs, penalties, echo,
errors in OpenAI's shape, and the Prometheus metrics they feed."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest
import torch
from models import greedy_reference
from servers import metric, wait_for_metric

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)


def reference_logprobs(reference, prompt: str, count: int) -> list[float]:
    """Greedy tokens' log-probabilities under model.generate's scores."""
    model, tokenizer = reference
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = model.generate(ids, max_new_tokens=count, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return [torch.log_softmax(step[0], -1).max().item() for step in out.logits]


def test_streamed_completion_equals_the_whole_one_and_ends_with_usage(server, client, reference):
    stream = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy_reference(reference, PROMPT, 10)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(reference[1](PROMPT).input_ids)


def test_raw_sse_ends_with_done(server):
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("usage" in json.loads(e[6:]) for e in events[:-1])


def sse_chunks(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json={"model": server.model_name, **body}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


@pytest.mark.parametrize("path, body, choices", [
    ("/v1/completions", {"prompt": [PROMPT, "Hello"], "n": 2}, 4),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2}, 2),
])
def test_continuous_usage_stats_put_usage_on_every_chunk_as_vllm_does(server, path, body, choices):
    """vLLM's extension that guidellm always sends: each chunk's usage is its choice's prompt and tokens so far."""
    chunks = sse_chunks(server, path, {**body, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
                                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    *per_choice, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6 * choices
    so_far: dict[int, int] = {}
    for chunk in per_choice:
        (choice,), usage = chunk["choices"], chunk["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["completion_tokens"] >= so_far.get(choice["index"], 0)
        so_far[choice["index"]] = usage["completion_tokens"]
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            assert usage["completion_tokens"] >= 1
    assert set(so_far.values()) == {6}
    prompts = {chunk["choices"][0]["index"]: chunk["usage"]["prompt_tokens"] for chunk in per_choice}
    assert sum(prompts[i] for i in range(0, len(prompts), 2)) == last["usage"]["prompt_tokens"]


def test_continuous_usage_stats_alone_implies_include_usage_unless_it_is_false(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    alone = sse_chunks(server, "/v1/completions", {**body, "stream_options": {"continuous_usage_stats": True}})
    assert all(c["usage"] for c in alone) and alone[-1]["choices"] == []
    off = sse_chunks(server, "/v1/completions",
                     {**body, "stream_options": {"continuous_usage_stats": True, "include_usage": False}})
    assert all(c["usage"] is None for c in off) and off[-1]["choices"]


def test_streamed_chat_with_the_async_client(server, reference):
    async def chat(stream: bool):
        async_client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Hi there"}]
        response = await async_client.chat.completions.create(model=server.model_name, messages=messages,
                                                              max_tokens=8, temperature=0, stream=stream)
        if not stream:
            return response.choices[0].message.content, response.choices[0].finish_reason
        chunks = [c async for c in response]
        assert chunks[0].choices[0].delta.role == "assistant"
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    whole, streamed = asyncio.run(chat(False)), asyncio.run(chat(True))
    assert streamed == whole
    assert whole[1] in ("stop", "length")


def test_n_choices_are_independent_samples_and_identical_when_greedy(server, client, reference):
    sampled = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=8, n=3, seed=7,
                                        temperature=1.0)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    assert len({c.text for c in sampled.choices}) > 1
    again = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=8, n=3, seed=7,
                                      temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]
    greedy = client.completions.create(model=server.model_name, prompt=[PROMPT, "Hello"], max_tokens=6, n=2,
                                       temperature=0)
    expected = [greedy_reference(reference, p, 6) for p in (PROMPT, PROMPT, "Hello", "Hello")]
    assert [c.text for c in sorted(greedy.choices, key=lambda c: c.index)] == expected
    assert greedy.usage.completion_tokens == 24
    assert greedy.usage.prompt_tokens == sum(len(reference[1](p).input_ids) for p in (PROMPT, "Hello"))


def test_streamed_n_choices_interleave_by_index(server, client, reference):
    stream = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5, n=2, temperature=0, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] != ""


def test_completion_logprobs_match_the_model(server, client, reference):
    completion = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=5, temperature=0,
                                           logprobs=3)
    choice = completion.choices[0]
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.token_logprobs == pytest.approx(reference_logprobs(reference, PROMPT, 5), abs=1e-4)
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs,
                                   choice.logprobs.top_logprobs):
        assert len(top) == 3 and top[token] == pytest.approx(logprob)  # greedy: the chosen token is the top one
    assert choice.logprobs.text_offset == [sum(map(len, choice.logprobs.tokens[:i])) for i in range(5)]


def test_chat_logprobs_streamed_and_not(server, client):
    kwargs = dict(model=server.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                  temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert "".join(t.token for t in whole.logprobs.content) == whole.message.content
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in whole.logprobs.content)
    streamed = [t for c in client.chat.completions.create(**kwargs, stream=True)
                for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole.logprobs.content])


def test_presence_and_frequency_penalties_follow_openai_definition(server, client, reference):
    model, tokenizer = reference
    ids = tokenizer(PROMPT).input_ids
    generated: list[int] = []
    for _ in range(8):  # greedy with logits[t] -= presence * (count > 0) + frequency * count
        logits = model(torch.tensor([ids + generated])).logits[0, -1]
        for token in set(generated):
            logits[token] -= 1.5 + 0.5 * generated.count(token)
        generated.append(int(logits.argmax()))
    completion = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=8, temperature=0,
                                           presence_penalty=1.5, frequency_penalty=0.5)
    head = tokenizer.decode(ids, skip_special_tokens=True)
    expected = tokenizer.decode(ids + generated, skip_special_tokens=True)[len(head):]
    assert completion.choices[0].text == expected


def test_echo_prepends_the_prompt(server, client, reference):
    completion = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=4, temperature=0,
                                           echo=True)
    assert completion.choices[0].text == PROMPT + greedy_reference(reference, PROMPT, 4)
    stream = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=4, temperature=0,
                                       echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream) == completion.choices[0].text


def test_token_id_prompts(server, client, reference):
    ids = reference[1](PROMPT).input_ids
    completion = client.completions.create(model=server.model_name, prompt=ids, max_tokens=5, temperature=0)
    assert completion.choices[0].text == greedy_reference(reference, PROMPT, 5)


BAD_REQUESTS = [
    ({"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [99999999]}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
]


@pytest.mark.parametrize("body, status, field", BAD_REQUESTS)
def test_bad_completion_requests_are_4xx_in_openai_shape(server, body, status, field):
    response = httpx.post(f"{server.url}/openai/v1/completions", json={"model": server.model_name, **body},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert field in error["message"] and error["code"] == status


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "max_completion_tokens": 5}, "max_tokens"),
]


REFUSED = {"logit_bias": {"1": 5}, "audio": {"voice": "alloy"}, "modalities": ["text"], "metadata": {"a": "b"},
           "store": True, "service_tier": "auto", "reasoning_effort": "low", "web_search_options": {},
           "guided_json": {"type": "object"}, "structured_outputs": {"json": {}}, "min_p": 0.1,
           "use_beam_search": True, "chat_template": "x", "skip_special_tokens": False}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_fields_the_readme_lists_as_refused_are_400_naming_them(server, field):
    body = {"model": server.model_name, "messages": [{"role": "user", "content": "x"}], field: REFUSED[field]}
    response = httpx.post(f"{server.url}/openai/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_vllm_stop_token_ids_end_the_choice_at_that_token(server, client, reference):
    model, tokenizer = reference
    ids = tokenizer(PROMPT).input_ids
    generated = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):]
    generated = generated.tolist()
    at = next(k for k in range(1, 6) if generated[k] not in generated[:k])  # its first occurrence
    stopped = client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                                        extra_body={"stop_token_ids": [generated[at]]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == at + 1
    head = tokenizer.decode(ids, skip_special_tokens=True)
    assert stopped.choices[0].text == tokenizer.decode(ids + generated[:at], skip_special_tokens=True)[len(head):]


@pytest.mark.parametrize("body, field", BAD_CHATS)
def test_bad_chat_requests_are_400_naming_the_field(server, body, field):
    response = httpx.post(f"{server.url}/openai/v1/chat/completions", json={"model": server.model_name, **body},
                          timeout=30)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]


@pytest.mark.parametrize("raw, param", [(b'{"model": "tiny", "prompt": ', "body"), (b"\x00", "body"),
                                        (b'{"model": "tiny", "prompt": "\xff\xfe"}', "prompt")])
def test_malformed_and_non_utf8_bodies_are_400(server, raw, param):
    response = httpx.post(f"{server.url}/openai/v1/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_oversize_body_is_413_declared_or_chunked(server):
    huge = json.dumps({"model": server.model_name, "prompt": "a" * (5 * 2**20)}).encode()
    declared = httpx.post(f"{server.url}/openai/v1/completions", content=huge,
                          headers={"content-type": "application/json"}, timeout=30)
    chunked = httpx.post(f"{server.url}/openai/v1/completions", timeout=30,
                         content=(huge[i:i + 2**20] for i in range(0, len(huge), 2**20)),
                         headers={"content-type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert "max_request_bytes" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models/{server.model_name}", timeout=10).status_code == 200


def test_openai_client_raises_its_own_errors(server, client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=server.model_name, prompt="x", temperature=5)
    assert raised.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:  # OpenAI's answer for a model it does not have
        client.completions.create(model="not-served", prompt="x")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/openai/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        assert metric(server, "predictor_num_requests_running") >= 1
    wait_for_metric(server, "predictor_num_requests_running", 0)
    wait_for_metric(server, "predictor_kv_cache_usage_ratio", 0)


def test_metrics_cover_requests_tokens_and_latencies(server, client):
    client.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=5, temperature=0)
    httpx.post(f"{server.url}/openai/v1/completions", json={"model": server.model_name, "prompt": 1}, timeout=30)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("predictor_time_to_first_token_seconds_count", "predictor_inter_token_latency_seconds_count",
                 "predictor_e2e_request_latency_seconds_count", "predictor_prompt_tokens_total",
                 "predictor_generation_tokens_total"):
        assert metric(server, name) > 0, name
    ok = r'predictor_http_requests_total\{method="POST",route="/openai/v1/completions",status="200"\} (\S+)'
    bad = r'predictor_http_requests_total\{method="POST",route="/openai/v1/completions",status="400"\} (\S+)'
    assert float(re.search(ok, text).group(1)) >= 1 and float(re.search(bad, text).group(1)) >= 1
    assert 'predictor_request_finished_total{finished_reason="length"}' in text


def long_prompt(topic: str) -> str:
    """A prompt of its own spanning many KV blocks (16 tokens each): no other test's prompt shares its blocks."""
    return f"A ledger about {topic}. " + " ".join(f"Line {i} notes the {topic} at dawn;" for i in range(24))


def cached_tokens(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_a_repeated_prompt_is_served_from_the_prefix_cache_with_the_same_text(server, client, reference):
    prompt, tokenizer = long_prompt("tides"), reference[1]
    length = len(tokenizer(prompt).input_ids)
    hits, queries = (metric(server, f"predictor_prefix_cache_{name}_total") for name in ("hits", "queries"))
    first = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=8, temperature=0)
    again = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=8, temperature=0)
    longer = client.completions.create(model=server.model_name, prompt=prompt + " Then", max_tokens=8,
                                       temperature=0)
    assert first.choices[0].text == again.choices[0].text == greedy_reference(reference, prompt, 8)
    assert longer.choices[0].text == greedy_reference(reference, prompt + " Then", 8)
    assert cached_tokens(first.usage) == 0
    assert cached_tokens(again.usage) == (length - 1) // 16 * 16 > 0  # whole blocks, never the last token
    assert cached_tokens(longer.usage) >= cached_tokens(again.usage)
    assert metric(server, "predictor_prefix_cache_hits_total") - hits == cached_tokens(again.usage) + cached_tokens(
        longer.usage)
    expected_queries = 2 * length + len(tokenizer(prompt + " Then").input_ids)
    assert metric(server, "predictor_prefix_cache_queries_total") - queries == expected_queries


def test_n_choices_compute_their_prompt_once(server, client, reference):
    prompt = long_prompt("winds")
    length = len(reference[1](prompt).input_ids)
    hits = metric(server, "predictor_prefix_cache_hits_total")
    response = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=4, n=4, temperature=0)
    assert [c.text for c in response.choices] == [greedy_reference(reference, prompt, 4)] * 4
    assert metric(server, "predictor_prefix_cache_hits_total") - hits == 3 * ((length - 1) // 16 * 16)
    assert cached_tokens(response.usage) == 0  # the usage counts the prompt once: as choice 0 found it


def test_streamed_chat_usage_reports_cached_tokens(server, client):
    messages = [{"role": "system", "content": long_prompt("currents")}, {"role": "user", "content": "Go on."}]

    def usage():
        stream = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=4,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].choices == []
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage

    (first_text, first), (again_text, again) = usage(), usage()
    assert again_text == first_text
    assert cached_tokens(first) == 0 and cached_tokens(again) == (first.prompt_tokens - 1) // 16 * 16 > 0


def test_openapi_document_lists_the_openai_routes_with_their_models(server):
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    for path in ("/openai/v1/completions", "/openai/v1/chat/completions", "/openai/v1/models"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert "CompletionRequest" in schemas and "presence_penalty" in schemas["ChatCompletionRequest"]["properties"]
