"""Clients nobody here wrote, driven for real against the served model: KServe's InferenceRESTClient (V1 and V2),
LangChain's ChatOpenAI (invoke, stream, JSON mode, structured output) and guidellm's streaming benchmark."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from models import greedy_reference
from pydantic import BaseModel
from servers import predictor_env

PROMPT = "The capital of France is"


class Verdict(BaseModel):
    ok: bool
    color: Literal["red", "green", "blue"]


VERDICT = Verdict.model_json_schema()


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


@pytest.fixture(scope="module")
def chat_model(server) -> ChatOpenAI:
    return ChatOpenAI(model=server.model_name, base_url=f"{server.url}/v1", api_key="unused", temperature=0,
                      max_tokens=16, max_retries=0, timeout=60)


def test_langchain_invoke_and_stream_give_the_same_reply(chat_model):
    whole = chat_model.invoke("Hi there")
    assert whole.content and whole.response_metadata["finish_reason"] in ("stop", "length")
    assert whole.usage_metadata["output_tokens"] >= 1
    chunks = list(chat_model.stream("Hi there", stream_usage=True))
    assert "".join(c.content for c in chunks) == whole.content
    merged = sum(chunks[1:], chunks[0])
    assert isinstance(merged, AIMessageChunk) and merged.usage_metadata == whole.usage_metadata


def test_langchain_json_mode_parses(chat_model):
    parsed = chat_model.with_structured_output(method="json_mode").invoke("Reply in JSON")
    assert isinstance(parsed, dict)
    bound = chat_model.bind(response_format={"type": "json_object"}).invoke("Reply in JSON")
    assert json.loads(bound.content) == parsed


def test_langchain_structured_output_with_a_pydantic_schema(chat_model):
    structured = chat_model.with_structured_output(Verdict, method="json_schema").bind(max_tokens=48)
    verdict = structured.invoke("Is Paris in France?")
    assert isinstance(verdict, Verdict)


def test_langchain_tool_binding_is_refused_naming_tools(chat_model):
    def weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    with pytest.raises(Exception, match="tools: tool calling is not supported"):
        chat_model.bind_tools([weather]).invoke("Weather in Paris?")


# ---- guidellm ---------------------------------------------------------------------------------------------------

GUIDELLM_REQUESTS = 8
GUIDELLM_OUTPUT_TOKENS = 8


@pytest.mark.parametrize("request_format", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_streaming_benchmark_has_no_request_errors(server, tiny_llama, tmp_path, request_format):
    """guidellm checks GET /health first, then streams every request with vLLM's continuous_usage_stats and
    ignore_eos; its token counts come from our usage."""
    guidellm = Path(sys.executable).with_name("guidellm")
    assert guidellm.is_file(), "guidellm is not installed: `make test` installs it (pip install -e '.[guidellm]')"
    report = tmp_path / "benchmarks.json"
    command = [
        str(guidellm), "run",
        "--backend", f"kind=openai_http,target={server.url},model={server.model_name},request_format={request_format}",
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
    for stats in requests["successful"]:
        body = json.loads(stats["request_args"])["body"]
        assert body["stream"] and body["stream_options"]["continuous_usage_stats"]
        assert stats["output_tokens"] == GUIDELLM_OUTPUT_TOKENS and stats["prompt_tokens"] >= 16
        assert stats["time_to_first_token_ms"] > 0
