"""FastChat's model-worker routes, as LLM Ops serves them: a thin adapter over GenerationService.

/worker_generate answers one JSON object; /worker_generate_stream answers JSON objects each followed by a
NUL byte, each carrying the text so far (cumulative, as FastChat's workers do), the last one its finish_reason.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.background import BackgroundTask

from predictor.api.json_bodies import ParsedBodyRoute
from predictor.api.service import GenerationService, ServedModel, failure, usage
from predictor.engine import Delta, EngineUnavailable, GenerationStream, InvalidRequest

# FastChat's ErrorCode.INTERNAL_ERROR and SERVER_ERROR_MSG, for a generation that fails after it started.
INTERNAL_ERROR_CODE = 50001
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
# FastChat's workers sample greedily below this temperature.
GREEDY_BELOW = 1e-5
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "ai": "assistant"}


class WorkerMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(description="system, user (or human), assistant (or ai)")
    text: str | None = Field(None, description="LLM Ops' name for the message text")
    content: str | None = Field(None, description="OpenAI's name for the message text")

    def as_chat(self, index: int) -> dict:
        if self.role not in ROLES:
            raise InvalidRequest(f"messages[{index}].role", f"{self.role!r} is not one of {sorted(ROLES)}")
        if (self.text is None) == (self.content is None):
            raise InvalidRequest(f"messages[{index}]", "give the message as exactly one of text or content")
        return {"role": ROLES[self.role], "content": self.text if self.text is not None else self.content}


class WorkerGenerateRequest(BaseModel):
    """FastChat's generation parameters plus LLM Ops' chat fields."""

    model_config = ConfigDict(extra="forbid")

    model_identifier: str | None = Field(None, description="LLM Ops' routing key; accepted, one model is served")
    model: str | None = Field(None, description="FastChat's model name; must be the served model if given")
    prompt: str | None = None
    messages: list[WorkerMessage] | None = None
    system_message: str | None = Field(None, description="A leading system message (chat); prepended (completion)")
    generation_mode: Literal["chat", "completion"] | None = Field(None, description="Implied by prompt/messages")
    temperature: float | None = Field(None, description="Below 1e-5 is greedy, as in FastChat")
    top_p: float | None = None
    top_k: int | None = Field(None, description="-1 or 0 disables")
    max_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    echo: bool = Field(True, description="Prefix the text with the prompt (FastChat's default)")
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    n: int = Field(1, description="Only 1 is served")
    best_of: int | None = Field(None, description="Only 1 is served")
    use_beam_search: bool = Field(False, description="Beam search is not served")
    logprobs: int | None = Field(None, description="Not served on the worker routes")

    def sampling(self) -> dict:
        greedy = self.temperature is not None and 0 <= self.temperature < GREEDY_BELOW
        return {
            "temperature": 0.0 if greedy else self.temperature,
            "top_p": self.top_p,
            "top_k": 0 if self.top_k == -1 else self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop or [],
            "stop_token_ids": self.stop_token_ids or [],
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
        }


class WorkerUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class WorkerOutput(BaseModel):
    text: str
    error_code: int = 0
    usage: WorkerUsage
    finish_reason: str | None = None


class CountTokenRequest(BaseModel):
    prompt: str


def worker_router(served: ServedModel) -> APIRouter:
    router = APIRouter(tags=["FastChat worker"], route_class=ParsedBodyRoute)
    ready = served.ready

    async def start(body: WorkerGenerateRequest) -> tuple[GenerationStream, str]:
        """Check the request, start its generation: the stream and the text echo puts before the output."""
        service = ready()
        served.check(body.model)
        _refuse_unserved(body)
        prompt_ids, prompt_text = await _encode(service, body)
        params = service.sampling_params(body.sampling(), len(prompt_ids))
        return service.start(prompt_ids, params), prompt_text if body.echo else ""

    @router.post("/worker_generate", response_model=WorkerOutput)
    async def worker_generate(body: WorkerGenerateRequest) -> WorkerOutput:
        stream, prefix = await start(body)
        return await _last(_outputs(stream, prefix))

    @router.post("/worker_generate_stream", response_class=StreamingResponse,
                 responses={200: {"description": "WorkerOutput JSON objects, each followed by a NUL byte"}})
    async def worker_generate_stream(body: WorkerGenerateRequest) -> StreamingResponse:
        stream, prefix = await start(body)
        # Cancelling after the response is a no-op for a finished generation and ends one whose client left.
        return StreamingResponse(_nul_delimited(_outputs(stream, prefix)), background=BackgroundTask(stream.cancel))

    @router.post("/worker_get_status")
    async def worker_get_status() -> dict:
        stats = ready().engine.stats
        return {"model_names": [served.name], "speed": 1, "queue_length": stats["running"] + stats["waiting"]}

    @router.post("/count_token")
    async def count_token(body: CountTokenRequest) -> dict:
        return {"count": len(await ready().encode_prompt(body.prompt)), "error_code": 0}

    @router.post("/model_details")
    async def model_details() -> dict:
        return {"context_length": ready().max_model_len}

    return router


def _refuse_unserved(body: WorkerGenerateRequest) -> None:
    if body.n != 1:
        raise InvalidRequest("n", "only n=1 is served")
    if body.best_of not in (None, 1):
        raise InvalidRequest("best_of", "only best_of=1 is served")
    if body.use_beam_search:
        raise InvalidRequest("use_beam_search", "beam search is not served")
    if body.logprobs:
        raise InvalidRequest("logprobs", "not served on the worker routes; use /openai/v1/completions")


async def _encode(service: GenerationService, body: WorkerGenerateRequest) -> tuple[list[int], str]:
    """The prompt's token ids and its text as echo shows it."""
    if _mode(body) == "completion":
        text = f"{body.system_message}\n\n{body.prompt}" if body.system_message else body.prompt
        return await service.encode_prompt(text), text
    messages = [m.as_chat(i) for i, m in enumerate(body.messages)]
    if body.system_message:
        if messages and messages[0]["role"] == "system":
            raise InvalidRequest("system_message", "give the system message once: here or as the first message")
        messages.insert(0, {"role": "system", "content": body.system_message})
    prompt_ids = await service.encode_chat(messages)
    return prompt_ids, service.tokenizer.decode(prompt_ids, skip_special_tokens=True)


def _mode(body: WorkerGenerateRequest) -> str:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("prompt", "give exactly one of prompt (completion) or messages (chat)")
    given = "completion" if body.prompt is not None else "chat"
    if body.generation_mode not in (None, given):
        needed = "messages" if body.generation_mode == "chat" else "prompt"
        raise InvalidRequest("generation_mode", f"{body.generation_mode!r} needs {needed}, not {_other(needed)}")
    return given


def _other(field: str) -> str:
    return "prompt" if field == "messages" else "messages"


async def _outputs(stream: GenerationStream, prefix: str) -> AsyncIterator[WorkerOutput]:
    """One output per piece of new text, then the final one; leaving early (client gone) cancels the generation."""
    text = prefix
    try:
        async for event in stream:
            if isinstance(event, Delta):
                if event.text:
                    text += event.text
                    yield WorkerOutput(text=text, usage=_usage(stream))
            elif event.finish_reason == "error":
                # FastChat's workers add an error's reason this way; a server fault's stays in the log.
                error = failure(event)
                reason = f"\n\n({error})" if isinstance(error, EngineUnavailable) else ""
                yield WorkerOutput(text=SERVER_ERROR_MSG + reason, error_code=INTERNAL_ERROR_CODE,
                                   usage=_usage(stream), finish_reason="error")
            else:
                yield WorkerOutput(text=text, usage=_usage(stream), finish_reason=event.finish_reason)
    finally:
        stream.cancel()


def _usage(stream: GenerationStream) -> WorkerUsage:
    return WorkerUsage(**usage(stream.prompt_tokens, stream.completion_tokens))


async def _last(outputs: AsyncIterator[WorkerOutput]) -> WorkerOutput:
    last = None
    async for last in outputs:  # noqa: B007 - only the final output is answered
        pass
    return last


async def _nul_delimited(outputs: AsyncIterator[WorkerOutput]) -> AsyncIterator[bytes]:
    async with aclosing(outputs):  # closing this generator closes the one that holds the generation
        async for output in outputs:
            yield json.dumps(output.model_dump()).encode() + b"\0"
