"""OpenAI-compatible completions under /openai/v1 (KServe's prefix) and /v1."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter, Request
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from pydantic import BaseModel, ConfigDict, Field

from predictor.engine import EngineUnavailable, InvalidRequest
from predictor.generation import TextGenerator

DISCONNECT_POLL_S = 0.1


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    n: int = Field(1, ge=1, le=1, description="Only n=1 is served so far.")
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = Field(False, description="Streaming is not served yet.")
    user: str | None = None

    def sampling(self) -> dict:
        return {
            "max_new_tokens": self.max_tokens, "min_new_tokens": self.min_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "repetition_penalty": self.repetition_penalty,
            "stop": self.stop or [], "seed": self.seed, "ignore_eos": self.ignore_eos,
        }


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


class ChatMessageIn(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn]
    max_tokens: int | None = Field(None, ge=1)


def completions_router(model_name: str, generator: Callable[[], TextGenerator | None]) -> APIRouter:
    router = APIRouter()

    def checked(body: SamplingFields) -> TextGenerator:
        text_generator = generator()
        if text_generator is None:
            raise EngineUnavailable(f"model {model_name} is still loading")
        if body.model != model_name:
            raise InvalidRequest("model", f"unknown model {body.model!r}; this server serves {model_name!r}")
        if body.stream:
            raise InvalidRequest("stream", "streaming is not supported yet")
        return text_generator

    @router.get("/openai/v1/models")  # not /v1/models: that is KServe's V1 model list
    async def list_models() -> dict:
        model = Model(id=model_name, created=int(time.time()), object="model", owned_by="llm-predictor")
        return {"object": "list", "data": [model.model_dump()]}

    @router.post("/openai/v1/chat/completions", response_model=ChatCompletion)
    @router.post("/v1/chat/completions", response_model=ChatCompletion, include_in_schema=False)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> ChatCompletion:
        text_generator = checked(body)
        prompt_ids = text_generator.encode_chat([m.model_dump() for m in body.messages])
        params = text_generator.sampling_params(body.sampling(), len(prompt_ids))
        completion = await _until_disconnected(request, text_generator.complete(prompt_ids, params))
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            object="chat.completion",
            created=int(time.time()),
            model=model_name,
            choices=[ChatChoice(index=0, finish_reason=completion.finish_reason, logprobs=None,
                                message=ChatCompletionMessage(role="assistant", content=completion.text))],
            usage=_usage([completion]),
        )

    @router.post("/openai/v1/completions", response_model=Completion)
    @router.post("/v1/completions", response_model=Completion, include_in_schema=False)
    async def create_completion(body: CompletionRequest, request: Request) -> Completion:
        text_generator = checked(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise InvalidRequest("prompt", "must not be empty")
        jobs = []
        for prompt in prompts:
            prompt_ids = text_generator.encode_prompt(prompt)
            jobs.append((prompt_ids, text_generator.sampling_params(body.sampling(), len(prompt_ids))))
        completions = await _until_disconnected(
            request, asyncio.gather(*(text_generator.complete(ids, params) for ids, params in jobs))
        )
        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            object="text_completion",
            created=int(time.time()),
            model=model_name,
            choices=[
                CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason, logprobs=None)
                for i, c in enumerate(completions)
            ],
            usage=_usage(completions),
        )

    return router


def _usage(completions) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=sum(c.prompt_tokens for c in completions),
        completion_tokens=sum(c.completion_tokens for c in completions),
        total_tokens=sum(c.prompt_tokens + c.completion_tokens for c in completions),
    )


async def _until_disconnected(request: Request, work):
    """Await work, cancelling it (which frees its KV cache) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            task.cancel()
            break
    return await task
