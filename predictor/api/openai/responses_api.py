"""OpenAI's Responses API: POST /openai/v1/responses (also /v1/responses), stateless, one text message out.

The conversation is rendered with the chat template as chat completions are (the same dialog rules), the answer
is one assistant message with one output_text part, in the openai package's own types. A stream is OpenAI's
Responses events, each an SSE `event:` and `data:` pair numbered by sequence_number: response.created,
response.in_progress, response.output_item.added, response.content_part.added, response.output_text.delta per
piece of text, response.output_text.done, response.content_part.done, response.output_item.done, then
response.completed (or response.incomplete when max_output_tokens cut it, response.failed if the engine failed).
Nothing is stored: there is no GET /responses/{id}.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseError,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextConfig,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response import IncompleteDetails
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pydantic import BaseModel

from predictor.api.dialogs import DialogError, check_no_control_strings, check_roles
from predictor.api.errors import INTERNAL_ERROR
from predictor.api.json_bodies import ParsedBodyRoute
from predictor.api.openai.responses_protocol import ResponsesRequest
from predictor.api.openai.routes import STREAM_HEADERS
from predictor.api.service import GenerationFailed, GenerationService, ServedModel
from predictor.engine import Delta, Finished, GenerationStream, InvalidRequest, SamplingParams

STATUS = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}  # by finish_reason


def responses_router(served: ServedModel) -> APIRouter:
    router = APIRouter(route_class=ParsedBodyRoute)

    @router.post("/openai/v1/responses", response_model=Response,
                 responses={200: {"content": {"text/event-stream": {}}}})
    @router.post("/v1/responses", response_model=Response, include_in_schema=False)
    async def create_response(body: ResponsesRequest):
        service = served.ready()
        served.check(body.model)
        prompt_ids = await _prompt_ids(service, body)
        params = _sampling_params(service, body, len(prompt_ids))
        await service.prepare(params, "text.format")
        answer = ResponseBuilder(served.name, body, params)
        generation = _started(service, prompt_ids, params)
        if body.stream:
            return StreamingResponse(_sse(answer.events(generation)), media_type="text/event-stream",
                                     headers=STREAM_HEADERS)
        return await answer.collect(generation)

    return router


async def _prompt_ids(service: GenerationService, body: ResponsesRequest) -> list[int]:
    """The chat-templated prompt; a dialog error names input (its own message indices) or instructions."""
    given = body.input_messages()
    try:
        check_roles(given)
        check_no_control_strings(given, service.forbidden_in_messages)
    except DialogError as err:
        raise InvalidRequest("input", err.detail) from None
    if body.instructions is not None:
        found = next((s for s in service.forbidden_in_messages if s in body.instructions), None)
        if found is not None:
            raise InvalidRequest("instructions", f"special tags are not allowed as part of the prompt (found "
                                                 f"{found!r})")
    return await service.encode_chat(body.messages(), "input")


def _sampling_params(service: GenerationService, body: ResponsesRequest, prompt_len: int) -> SamplingParams:
    response_format = body.response_format()
    schema = response_format and response_format.json_schema_wanted()
    wanted = {"max_new_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
              "seed": body.seed, "stop": body.stop, "ignore_eos": body.ignore_eos, "top_k": body.top_k,
              "repetition_penalty": body.repetition_penalty,
              "structured_output": {"json_schema": schema} if schema else None}
    return service.sampling_params(wanted, prompt_len)


def _started(service: GenerationService, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
    try:
        return service.start(prompt_ids, params)
    except InvalidRequest as err:
        if err.field != "max_new_tokens":
            raise
        raise InvalidRequest("max_output_tokens", str(err).split(": ", 1)[-1].replace(
            "max_new_tokens", "max_output_tokens")) from None


class ResponseBuilder:
    """One request's Response, whole or as the stream of events that builds it."""

    def __init__(self, model_name: str, body: ResponsesRequest, params: SamplingParams):
        self.model_name = model_name
        self.body = body
        self.params = params
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = time.time()
        self.sequence_numbers = itertools.count()
        self.text_format = ResponseTextConfig.model_validate(
            {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)}
            if body.text and body.text.format else {"format": {"type": "text"}})

    async def collect(self, generation: GenerationStream) -> Response:
        pieces: list[str] = []
        try:
            async for event in generation:
                if isinstance(event, Delta):
                    pieces.append(event.text)
                else:
                    return self._finished(event, "".join(pieces))
        finally:
            generation.cancel()  # a no-op once finished
        raise GenerationFailed("generation ended without a final event")

    async def events(self, generation: GenerationStream) -> AsyncIterator[BaseModel]:
        try:
            async for event in self._events(generation):
                yield event
        finally:
            generation.cancel()  # the client left mid-stream; a no-op once finished

    async def _events(self, generation: GenerationStream) -> AsyncIterator[BaseModel]:
        yield ResponseCreatedEvent(type="response.created", response=self.response("in_progress"),
                                   sequence_number=self._next())
        yield ResponseInProgressEvent(type="response.in_progress", response=self.response("in_progress"),
                                      sequence_number=self._next())
        yield ResponseOutputItemAddedEvent(type="response.output_item.added", output_index=0,
                                           item=self.message(None, "in_progress"), sequence_number=self._next())
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        yield ResponseContentPartAddedEvent(type="response.content_part.added", part=self.output_text(""), **where,
                                            sequence_number=self._next())
        pieces: list[str] = []
        async for event in generation:
            if isinstance(event, Delta):
                if event.text:
                    pieces.append(event.text)
                    yield ResponseTextDeltaEvent(type="response.output_text.delta", delta=event.text, logprobs=[],
                                                 **where, sequence_number=self._next())
                continue
            text = "".join(pieces)
            try:
                response = self._finished(event, text)
            except GenerationFailed:
                error = ResponseError(code="server_error", message=INTERNAL_ERROR)
                yield ResponseFailedEvent(type="response.failed", response=self.response("failed", error=error),
                                          sequence_number=self._next())
                return
            yield ResponseTextDoneEvent(type="response.output_text.done", text=text, logprobs=[], **where,
                                        sequence_number=self._next())
            yield ResponseContentPartDoneEvent(type="response.content_part.done", part=self.output_text(text),
                                               **where, sequence_number=self._next())
            yield ResponseOutputItemDoneEvent(type="response.output_item.done", output_index=0,
                                              item=response.output[0], sequence_number=self._next())
            if response.status == "completed":
                yield ResponseCompletedEvent(type="response.completed", response=response,
                                             sequence_number=self._next())
            else:
                yield ResponseIncompleteEvent(type="response.incomplete", response=response,
                                              sequence_number=self._next())
            return

    def _finished(self, event: Finished, text: str) -> Response:
        if event.finish_reason == "error":
            raise GenerationFailed(f"generation failed: {event.error}")
        status = STATUS[event.finish_reason]
        usage = ResponseUsage(
            input_tokens=event.prompt_tokens, output_tokens=event.completion_tokens,
            total_tokens=event.prompt_tokens + event.completion_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0))
        incomplete = IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
        message = self.message(text, "completed" if status == "completed" else "incomplete")
        return self.response(status, [message], usage=usage, incomplete_details=incomplete,
                             completed_at=time.time() if status == "completed" else None)

    def response(self, status: str, output: list | None = None, **fields) -> Response:
        body = self.body
        return Response(
            id=self.id, object="response", created_at=self.created_at, model=self.model_name, status=status,
            output=output or [], instructions=body.instructions, metadata=body.metadata,
            max_output_tokens=body.max_output_tokens, temperature=self.params.temperature, top_p=self.params.top_p,
            parallel_tool_calls=False, tool_choice="none", tools=[], text=self.text_format, truncation="disabled",
            background=False, user=body.user, safety_identifier=body.safety_identifier, **fields)

    def message(self, text: str | None, status: str) -> ResponseOutputMessage:
        content = [] if text is None else [self.output_text(text)]
        return ResponseOutputMessage(id=self.message_id, type="message", role="assistant", status=status,
                                     content=content)

    @staticmethod
    def output_text(text: str) -> ResponseOutputText:
        return ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])

    def _next(self) -> int:
        return next(self.sequence_numbers)


async def _sse(events: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends the Responses stream: each with its type as the event name, no [DONE]."""
    async for event in events:
        yield f"event: {event.type}\ndata: {event.model_dump_json(warnings=False)}\n\n"
