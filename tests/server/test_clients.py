"""Clients nobody here wrote, driven for real against the served model: KServe's InferenceRESTClient (V1 and V2),
the openai client's Responses API, LangChain's ChatOpenAI (invoke, stream, JSON mode, structured output) and
OpenAIEmbeddings, and guidellm's streaming benchmark, each on the base URLs the README gives it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from models import greedy_reference
from pydantic import BaseModel
from servers import predictor_env

PROMPT = "The capital of France is"


class Verdict(BaseModel):
    ok: bool
    color: Literal["red", "green", "blue"]


VERDICT = Verdict.model_json_schema()


class Summary(BaseModel):
    """A free string: the model alone would never end it."""

    summary: str


def kserve_client(protocol: str) -> InferenceRESTClient:
    return InferenceRESTClient(RESTConfig(protocol=protocol, retries=0, timeout=60))


def test_kserve_client_v1_liveness_readiness_and_predict(server, reference):
    async def drive():
        async with kserve_client("v1") as client:
            live = await client.is_server_live(server.url)
            ready = await client.is_model_ready(server.url, server.model_name)
            answer = await client.infer(server.url, {"instances": [
                {"prompt": PROMPT, "parameters": {"max_new_tokens": 8, "temperature": 0}},
                {"prompt": PROMPT, "parameters": {"max_new_tokens": 48, "temperature": 0,
                                                  "structured_output": {"json_schema": VERDICT}}}]},
                model_name=server.model_name)
            return live, ready, answer

    live, ready, answer = asyncio.run(drive())
    assert live is True and ready is True
    free, constrained = answer["predictions"]
    assert free["generated_text"] == greedy_reference(reference, PROMPT, 8)
    assert free["usage"]["completion_tokens"] == 8
    assert constrained["finish_reason"] == "stop"
    Verdict.model_validate_json(constrained["generated_text"])


def test_kserve_client_v2_liveness_readiness_and_infer(server, reference):
    async def drive():
        async with kserve_client("v2") as client:
            request = InferRequest(server.model_name, [InferInput("text_input", [2], "BYTES", [PROMPT, "Hello"])],
                                   parameters={"max_new_tokens": 6, "temperature": 0})
            return (await client.is_server_live(server.url), await client.is_server_ready(server.url),
                    await client.is_model_ready(server.url, server.model_name),
                    await client.infer(server.url, request, model_name=server.model_name))

    live, ready, model_ready, response = asyncio.run(drive())
    assert (live, ready, model_ready) == (True, True, True)
    (output,) = response.outputs
    assert output.name == "text_output" and output.datatype == "BYTES"
    assert [t.decode() if isinstance(t, bytes) else t for t in output.data] == [
        greedy_reference(reference, p, 6) for p in (PROMPT, "Hello")]


def test_kserve_client_sees_an_unknown_model_as_not_ready(server):
    async def drive():
        async with kserve_client("v2") as client:
            return await client.is_model_ready(server.url, "no-such-model")

    assert asyncio.run(drive()) is False


# ---- LangChain --------------------------------------------------------------------------------------------------


def langchain_chat(server, base_url: str = "/v1", **settings) -> ChatOpenAI:
    settings = {"temperature": 0, "max_tokens": 16} | settings
    return ChatOpenAI(model=server.model_name, base_url=f"{server.url}{base_url}", api_key="unused", max_retries=0,
                      timeout=60, **settings)


@pytest.fixture(scope="module")
def chat_model(server) -> ChatOpenAI:
    return langchain_chat(server)


def test_langchain_invoke_and_stream_give_the_same_reply(chat_model):
    whole = chat_model.invoke("Hi there")
    assert whole.content and whole.response_metadata["finish_reason"] in ("stop", "length")
    assert whole.usage_metadata["output_tokens"] >= 1
    chunks = list(chat_model.stream("Hi there", stream_usage=True))
    assert "".join(c.content for c in chunks) == whole.content
    merged = sum(chunks[1:], chunks[0])
    assert isinstance(merged, AIMessageChunk) and merged.usage_metadata == whole.usage_metadata


SAMPLINGS = [{"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"temperature": 1.0, "seed": 4}]


@pytest.mark.parametrize("max_tokens", [16, 64])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seed-3", "seed-4"])
def test_langchain_json_mode_finishes_within_max_tokens(server, max_tokens, sampling):
    """The model never closes a string of its own; the answer still ends with stop, as JSON."""
    model = langchain_chat(server, "/openai/v1", max_tokens=max_tokens, **sampling)
    answer = model.with_structured_output(method="json_mode", include_raw=True).invoke("Reply in JSON")
    assert answer["raw"].response_metadata["finish_reason"] == "stop", answer["raw"].content
    assert answer["parsing_error"] is None and isinstance(answer["parsed"], dict)
    if not sampling["temperature"]:
        bound = model.bind(response_format={"type": "json_object"}).invoke("Reply in JSON")
        assert json.loads(bound.content) == answer["parsed"]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seed-3", "seed-4"])
def test_langchain_json_schema_with_a_free_string_finishes_within_64_tokens(server, sampling):
    model = langchain_chat(server, max_tokens=64, **sampling)
    answer = model.with_structured_output(Summary, method="json_schema", include_raw=True).invoke("Summarise Paris")
    assert answer["raw"].response_metadata["finish_reason"] == "stop", answer["raw"].content
    assert isinstance(answer["parsed"], Summary)


def test_langchain_structured_output_with_a_pydantic_schema(server):
    structured = langchain_chat(server, max_tokens=48).with_structured_output(Verdict, method="json_schema")
    verdict = structured.invoke("Is Paris in France?")
    assert isinstance(verdict, Verdict)


def test_langchain_tool_binding_is_refused_naming_tools(chat_model):
    def weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    with pytest.raises(Exception, match="tools: tool calling is not supported"):
        chat_model.bind_tools([weather]).invoke("Weather in Paris?")


def test_langchain_embeddings_with_the_documented_setting(server):
    """check_embedding_ctx_length=False: texts go as texts. Its default tokenizes them with tiktoken (a download)
    and sends cl100k ids, which are not this model's: those past its vocabulary are a 400 saying so."""
    embeddings = OpenAIEmbeddings(model=server.model_name, base_url=f"{server.url}/openai/v1", api_key="unused",
                                  check_embedding_ctx_length=False, max_retries=0)
    texts = ["What is the capital of France?", "Paris"]
    vectors = embeddings.embed_documents(texts)
    direct = httpx.post(f"{server.url}/v1/embeddings", json={"model": server.model_name, "input": texts},
                        timeout=60).json()["data"]
    assert len(vectors) == 2
    for vector, item in zip(vectors, direct, strict=True):
        assert vector == pytest.approx(item["embedding"], abs=1e-6)
    assert embeddings.embed_query("Paris") == pytest.approx(vectors[1], abs=1e-6)
    cl100k_ids = [3923, 374, 100000]  # cl100k_base's ids run to 100255; past 32000 they cannot be this model's
    refused = httpx.post(f"{server.url}/v1/embeddings", timeout=60,
                         json={"model": server.model_name, "input": [cl100k_ids]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input[0]"
    assert "this model's own tokenizer's" in refused.json()["error"]["message"]


# ---- OpenAI's Responses API, through the official client -------------------------------------------------------


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)


def test_responses_create_answers_as_chat_completions_do(server, client):
    response = client.responses.create(model=server.model_name, input="Hello", max_output_tokens=12,
                                       temperature=0)
    chat = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=12, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.output_text == chat.choices[0].message.content and response.output_text
    finished = chat.choices[0].finish_reason == "stop"
    assert (response.status, message.status) == (("completed",) * 2 if finished else ("incomplete",) * 2)
    if not finished:
        assert response.incomplete_details.reason == "max_output_tokens"
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert (response.temperature, response.max_output_tokens, response.model) == (0, 12, server.model_name)


def test_responses_take_a_dialog_with_instructions_as_chat_does(server, client):
    dialog = [{"role": "developer", "content": "Be terse."},
              {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
              {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
              {"role": "user", "content": "Tell me about Paris."}]
    response = client.responses.create(model=server.model_name, input=dialog, instructions="Answer in French.",
                                       max_output_tokens=10, temperature=0)
    chat = client.chat.completions.create(model=server.model_name, max_tokens=10, temperature=0, messages=[
        {"role": "system", "content": "Answer in French.\n\nBe terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me about Paris."}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens and response.instructions == "Answer in French."


def test_responses_stream_their_events_in_order_and_add_up_to_the_whole(server, client):
    whole = client.responses.create(model=server.model_name, input="Hello", max_output_tokens=12, temperature=0)
    events = list(client.responses.create(model=server.model_name, input="Hello", max_output_tokens=12,
                                          temperature=0, stream=True))
    kinds = [event.type for event in events]
    last = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          last]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert len({event.response.id for event in events if hasattr(event, "response")}) == 1
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == events[-4].text == events[-2].item.content[0].text == whole.output_text
    assert events[-1].response.output_text == text and events[-1].response.usage.output_tokens == 12


class Reply(BaseModel):
    ok: bool
    note: str


def test_responses_json_schema_output_parses_and_validates(server, client):
    text_format = {"format": {"type": "json_schema", "name": "verdict", "schema": VERDICT, "strict": True}}
    response = client.responses.create(model=server.model_name, input="Is Paris in France?", temperature=0,
                                       max_output_tokens=48, text=text_format)
    assert response.status == "completed" and response.text.format.type == "json_schema"
    jsonschema.validate(json.loads(response.output_text), VERDICT)
    parsed = client.responses.parse(model=server.model_name, input="Reply", max_output_tokens=64, temperature=1.0,
                                    top_p=0.9, text_format=Reply)  # a free string: it finishes all the same
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Reply)
    with client.responses.stream(model=server.model_name, input="Reply", max_output_tokens=64, temperature=0,
                                 text_format=Reply) as stream:
        assert isinstance(stream.get_final_response().output_parsed, Reply)
    json_object = client.responses.create(model=server.model_name, input="JSON", max_output_tokens=32,
                                          temperature=0, text={"format": {"type": "json_object"}})
    assert json_object.status == "completed" and isinstance(json.loads(json_object.output_text), dict)


def test_responses_are_served_under_v1_too(server):
    aliased = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    response = aliased.responses.create(model=server.model_name, input="Hello", max_output_tokens=4, temperature=0)
    assert response.usage.output_tokens == 4 or response.status == "completed"


REFUSED = [("tools", [{"type": "function", "name": "f", "parameters": {}}], "tool calling is not supported"),
           ("tool_choice", "required", "tool calling is not supported"),
           ("previous_response_id", "resp_123", "stores no responses"),
           ("background", True, "background responses are not supported"),
           ("reasoning", {"effort": "low"}, "reasoning options are not supported"),
           ("include", ["message.output_text.logprobs"], "include"),
           ("truncation", "auto", "'disabled'"),
           ("service_tier", "flex", "Extra inputs are not permitted")]


@pytest.mark.parametrize("field, value, said", REFUSED, ids=[r[0] for r in REFUSED])
def test_responses_refuse_what_needs_tools_or_state_by_name(server, client, field, value, said):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=server.model_name, input="Hi", max_output_tokens=4, **{field: value})
    error = refused.value.body
    assert error["param"] == field and error["message"].startswith(f"{field}: ") and said in error["message"]


@pytest.mark.parametrize("request_body, field, said", [
    ({"input": [{"role": "assistant", "content": "Hi"}]}, "input", "0.role: expected 'user'"),
    ({"input": "Hi", "instructions": "[INST] x"}, "instructions", "special tags"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.messages.0.content",
     "input_image"),
    ({"input": "Hi", "max_output_tokens": 600}, "max_output_tokens", "max_model_len"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format",
     "name and schema"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "reply"}}}, "text.format", "name and schema"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "objectx"}}}},
     "text.format", "unusable JSON schema"),
], ids=["dialog", "instructions", "image", "too-long", "unnamed-schema", "no-schema", "bad-schema"])
def test_responses_bad_input_is_a_400_naming_the_field(server, request_body, field, said):
    response = httpx.post(f"{server.url}/openai/v1/responses", json={"model": server.model_name, **request_body},
                          timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(field) and said in error["message"], error


# ---- guidellm ---------------------------------------------------------------------------------------------------

GUIDELLM_REQUESTS = 8
GUIDELLM_OUTPUT_TOKENS = 8


@pytest.mark.parametrize("base_url, request_format", [
    ("", "/v1/completions"), ("/v1", "/v1/chat/completions"), ("/openai/v1", "/v1/responses")])
def test_guidellm_streaming_benchmark_has_no_request_errors(server, tiny_llama, tmp_path, base_url, request_format):
    """guidellm strips /v1 from its target and checks GET {target}/health first (/health, /openai/health), then
    streams every request with ignore_eos (and chat's and completions' continuous_usage_stats); its token counts
    come from our usage."""
    guidellm = Path(sys.executable).with_name("guidellm")
    assert guidellm.is_file(), "guidellm is not installed: `make test` installs it (pip install -e '.[guidellm]')"
    report = tmp_path / "benchmarks.json"
    target = f"{server.url}{base_url}"
    command = [
        str(guidellm), "run",
        "--backend", f"kind=openai_http,target={target},model={server.model_name},request_format={request_format}",
        "--profile", "kind=concurrent,streams=4",
        "--constraint", f"kind=max_requests,count={GUIDELLM_REQUESTS}",
        "--data", f"kind=synthetic_text,prompt_tokens=16,output_tokens={GUIDELLM_OUTPUT_TOKENS}",
        "--tokenizer", f"kind=huggingface_auto,model={tiny_llama}",
        "--output", f"kind=json,path={report}",
        "--disable-console",
    ]
    run = subprocess.run(command, cwd=tmp_path, env=predictor_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    requests = benchmark["requests"]
    assert not requests["errored"] and not requests["incomplete"], requests["errored"][:1]
    assert len(requests["successful"]) == GUIDELLM_REQUESTS
    assert f"POST {base_url.removesuffix('/v1')}{request_format} 200" in server.output()  # guidellm's own path
    for stats in requests["successful"]:
        body = json.loads(stats["request_args"])["body"]
        assert body["stream"] and body["ignore_eos"]
        if request_format != "/v1/responses":
            assert body["stream_options"]["continuous_usage_stats"]
        assert stats["output_tokens"] == GUIDELLM_OUTPUT_TOKENS and stats["prompt_tokens"] >= 16
        assert stats["time_to_first_token_ms"] > 0


def test_start_up_names_our_openai_routes_not_kserves_notices(server):
    log = server.output()
    assert "OpenAI endpoints not registered" not in log and "Time series endpoints not registered" not in log
    assert "serving OpenAI's API at /openai/health, /openai/v1/chat/completions" in log
    assert "/openai/v1/responses" in log
