"""What every route needs between HTTP and the engine: the served model's name and readiness, prompt and chat
encoding (off the event loop, bounded before tokenizing), structured-output grammars (compiled on the
engine core's threads), the server's sampling defaults, and collecting generations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from predictor.api.dialogs import check_dialog, control_strings
from predictor.api.errors import ModelNotFound
from predictor.engine import (
    SHUTTING_DOWN,
    Delta,
    Engine,
    EngineUnavailable,
    Finished,
    GenerationStream,
    InvalidRequest,
    SamplingParams,
)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The token counts every API reports, under OpenAI's names."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class ModelShape:
    """What the front-ends may tell clients about the model."""

    hidden_size: int
    vocab_size: int




class GenerationService:
    def __init__(self, engine: Engine, tokenizer, chat_template: str | None, defaults: dict, max_model_len: int,
                 shape: ModelShape | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.defaults = defaults
        self.max_model_len = max_model_len
        self.shape = shape

    @cached_property
    def max_prompt_chars(self) -> int:
        """No text longer than this can fit max_model_len tokens: each token spells at most its longest piece."""
        longest = max((len(piece) for piece in self.tokenizer.get_vocab()), default=1)
        return self.max_model_len * max(longest, 1)

    async def encode_prompt(self, prompt, field: str = "prompt") -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidRequest(field, "must be a string")
        if not prompt:  # it would still tokenize, to a lone BOS token
            raise InvalidRequest(field, "must not be empty")
        self._check_length(prompt, field)
        return await asyncio.to_thread(lambda: self.tokenizer(prompt).input_ids)

    async def encode_chat(self, messages, field: str = "messages") -> list[int]:
        """The dialog's prompt ids; a 400 for bad roles or text that could forge a turn."""
        if not isinstance(messages, list):
            raise InvalidRequest(field, "must be a list of {role, content} messages")
        try:
            checked = [ChatMessage.model_validate(m).model_dump() for m in messages]
        except ValidationError as err:
            raise InvalidRequest(field, first_error(err)) from None
        if self.chat_template is None:
            raise InvalidRequest(field, "this model has no chat template; start it with --chat_template")
        self._check_length("".join(m["content"] for m in checked), field)
        check_dialog(checked, self.forbidden_in_messages)
        return await asyncio.to_thread(self._render_chat, checked)

    def _render_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _check_length(self, text: str, field: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise InvalidRequest(field, f"{len(text)} characters cannot fit max_model_len ({self.max_model_len} "
                                        f"tokens, at most {self.max_prompt_chars} characters)")

    @cached_property
    def forbidden_in_messages(self) -> tuple[str, ...]:
        """The chat template's turn markers and the tokenizer's special tokens (see predictor/api/dialogs.py)."""
        return control_strings(self.chat_template, self.tokenizer)

    def sampling_params(self, parameters, prompt_len: int, field: str = "parameters") -> SamplingParams:
        """Request parameters over the server defaults; max_new_tokens defaults to what fits the context."""
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise InvalidRequest(field, f"must be an object, not {type(parameters).__name__}")
        given = {k: v for k, v in parameters.items() if v is not None}
        if "max_new_tokens" not in given:
            given["max_new_tokens"] = max(1, min(self.defaults["max_new_tokens"], self.max_model_len - prompt_len))
        try:
            return SamplingParams(**{**self.defaults, **given})
        except ValidationError as err:
            raise InvalidRequest(first_field(err, field), err.errors()[0]["msg"]) from None

    async def prepare(self, params: SamplingParams, field: str) -> None:
        """Compile params' structured-output grammar on the core's grammar threads (a large schema takes a while), so
        that start() finds it compiled; a schema too large is refused at once, one that cannot be used after
        compiling, each a 400 naming field."""
        if params.structured_output is not None:
            await self.engine.compile_grammar(params, field)

    def start(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        return self.engine.submit(prompt_ids, params)

    def start_all(self, jobs: list[tuple[list[int], SamplingParams]], field: str) -> list[GenerationStream]:
        """A request's generations queued together or not at all (see Engine.submit_all); field names what
        holds them, for the 400 when they can never fit the queue."""
        return self.engine.submit_all(jobs, field)

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        return await self._collect(self.start(prompt_ids, params))

    async def _collect(self, stream: GenerationStream) -> GenerationResult:
        pieces: list[str] = []
        try:
            async for event in stream:
                if isinstance(event, Delta):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    if event.finish_reason == "error":
                        raise failure(event)
                    return GenerationResult("".join(pieces), event.finish_reason, event.prompt_tokens,
                                            event.completion_tokens)
        finally:
            stream.cancel()
        raise GenerationFailed("generation ended without a final event")

    async def complete_all(self, jobs: list[tuple[list[int], SamplingParams]], field: str) -> list[GenerationResult]:
        """Every job at once, queued together or not at all; one failing (or the request being cancelled) cancels
        the rest, freeing their KV."""
        tasks = [asyncio.ensure_future(self._collect(stream)) for stream in self.start_all(jobs, field)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()


class GenerationFailed(RuntimeError):
    """A generation ended with an error inside the engine: a server fault, not the client's."""


def failure(finished: Finished) -> GenerationFailed | EngineUnavailable:
    """What a generation that finished with an error raises: the shutdown ended it (a 503, worth retrying
    elsewhere) or it failed (a 500)."""
    if finished.error == SHUTTING_DOWN:
        return EngineUnavailable(SHUTTING_DOWN)
    return GenerationFailed(f"generation failed: {finished.error}")


class ServedModel:
    """The model a router serves: its name, and its GenerationService once loaded and while not unloaded."""

    def __init__(self, name: str, service: Callable[[], GenerationService | None],
                 unloaded: Callable[[], bool] = lambda: False):
        self.name = name
        self._service = service
        self._unloaded = unloaded

    def ready(self) -> GenerationService:
        if self.unloaded:
            raise EngineUnavailable(f"model {self.name} is unloaded; POST /v2/repository/models/{self.name}/load "
                                    "serves it again")
        service = self._service()
        if service is None:
            raise EngineUnavailable(f"model {self.name} is still loading")
        return service

    @property
    def engine(self) -> Engine | None:
        """The engine, serving or unloaded (what a shutdown drains); None while the model loads."""
        service = self._service()
        return service.engine if service is not None else None

    @property
    def unloaded(self) -> bool:
        """KServe's model repository unloaded the model: the weights stay, no request is taken."""
        return self._unloaded()

    def check(self, requested: str | None) -> None:
        """A request naming another model is a 404, as OpenAI answers it; naming none means this one."""
        if requested is not None and requested != self.name:
            raise ModelNotFound(requested, self.name)


def check_in_vocabulary(ids: list[int], vocab_size: int, field: str) -> None:
    """Token ids are the served tokenizer's; another's (LangChain's tiktoken cl100k ids) that happen to fall
    inside this vocabulary cannot be told apart, those past its end can."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(field, f"token id {bad} is outside the vocabulary [0, {vocab_size}): token ids must be "
                                    "this model's own tokenizer's (not tiktoken's cl100k_base, say); or send text")


def first_field(err: ValidationError, default: str) -> str:
    loc = err.errors()[0]["loc"]
    return ".".join(str(p) for p in loc) or default


def first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where + ': ' if where else ''}{first['msg']}"
