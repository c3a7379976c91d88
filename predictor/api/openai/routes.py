"""OpenAI-compatible completions, chat completions and models under /openai/v1 (KServe's prefix) and /v1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion
from pydantic import BaseModel

from predictor.api.json_bodies import ParsedBodyRoute, json_response
from predictor.api.openai.protocol import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, SamplingFields
from predictor.api.openai.responses import ChatResponses, CompletionResponses, ResponseBuilder
from predictor.api.service import GenerationService, ServedModel, check_in_vocabulary
from predictor.engine import Delta, Finished, GenerationStream, InvalidRequest

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def completions_router(served: ServedModel) -> APIRouter:
    router = APIRouter(route_class=ParsedBodyRoute)
    model_name = served.name

    def checked(body: SamplingFields) -> GenerationService:
        service = served.ready()
        served.check(body.model)
        return service

    @router.get("/openai/v1/models")  # not /v1/models: that is KServe's V1 model list
    async def list_models() -> dict:
        model = Model(id=model_name, created=int(time.time()), object="model", owned_by="llm-predictor")
        return {"object": "list", "data": [model.model_dump()]}

    @router.post("/openai/v1/chat/completions", response_model=ChatCompletion,
                 responses={200: {"content": {"text/event-stream": {}}}})
    @router.post("/v1/chat/completions", response_model=ChatCompletion, include_in_schema=False)
    async def create_chat_completion(body: ChatCompletionRequest):
        service = checked(body)
        prompt_ids = await service.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        responses = ChatResponses(model_name, service.tokenizer, body.n, body.include_usage, [len(prompt_ids)],
                                  body.continuous_usage)
        return await _respond(body, service, [prompt_ids], responses)

    @router.post("/openai/v1/completions", response_model=Completion,
                 responses={200: {"content": {"text/event-stream": {}}}})
    @router.post("/v1/completions", response_model=Completion, include_in_schema=False)
    async def create_completion(body: CompletionRequest):
        service = checked(body)
        prompts = body.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequest("prompt", "must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequest("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        prompt_ids = [await _prompt_ids(service, p, f"prompt.{i}" if len(prompts) > 1 else "prompt")
                      for i, p in enumerate(prompts)]
        echoed = [service.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt_ids] \
            if body.echo else None
        responses = CompletionResponses(model_name, service.tokenizer, body.n, body.include_usage,
                                        [len(ids) for ids in prompt_ids], body.continuous_usage, echoed)
        return await _respond(body, service, prompt_ids, responses)

    return router


async def _prompt_ids(service: GenerationService, prompt: str | list[int], field: str) -> list[int]:
    if isinstance(prompt, str):
        return await service.encode_prompt(prompt, field)
    check_in_vocabulary(prompt, len(service.tokenizer), field)
    return list(prompt)


async def _respond(body: SamplingFields, service: GenerationService,
                   prompt_ids: list[list[int]], responses: ResponseBuilder):
    try:
        jobs = [(ids, service.sampling_params(body.sampling(j), len(ids))) for ids in prompt_ids
                for j in range(body.n)]
        await service.prepare(jobs[0][1], "response_format")  # every choice has the same response_format
        streams = service.start_all(jobs, "n" if body.n > 1 else "prompt")  # every choice queued, or none
    except InvalidRequest as err:  # in OpenAI's words: max_tokens, not the engine's max_new_tokens
        raise err.renamed(body.engine_names()) from None
    events = _merged(streams)
    if body.stream:
        return StreamingResponse(_sse(responses.chunks(events)), media_type="text/event-stream", headers=STREAM_HEADERS)
    return await json_response(await responses.collect(events))


async def _merged(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, Delta | Finished]]:
    """(choice index, event) from every stream as events arrive; closing this cancels what is unfinished."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            streams[0].cancel()
        return
    arrivals: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        async for event in stream:
            arrivals.put_nowait((index, event))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    unfinished = len(streams)
    try:
        while unfinished:
            index, event = await arrivals.get()
            unfinished -= isinstance(event, Finished)
            yield index, event
    finally:
        for task in pumps:
            task.cancel()
        for stream in streams:
            stream.cancel()


async def _sse(chunks: AsyncIterator[BaseModel | dict]) -> AsyncIterator[str]:
    async for chunk in chunks:
        data = chunk.model_dump_json(warnings=False) if isinstance(chunk, BaseModel) else json.dumps(chunk)
        yield f"data: {data}\n\n"
    yield "data: [DONE]\n\n"


