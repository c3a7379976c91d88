"""Text in, text out: prompt and chat encoding, sampling defaults, and collecting a generation stream."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from predictor.dialogs import check_dialog, control_strings
from predictor.engine import Delta, Engine, Finished, GenerationStream, InvalidRequest, SamplingParams


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TextGenerator:
    """What every route needs: turn text or messages into a stream, with the server's defaults applied."""

    def __init__(self, engine: Engine, tokenizer, chat_template: str | None, defaults: dict, max_model_len: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.defaults = defaults
        self.max_model_len = max_model_len

    def encode_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt", "must be a string")
        return self.tokenizer(prompt).input_ids

    def encode_chat(self, messages: list) -> list[int]:
        """The dialog's prompt ids; DialogError (a 400) for bad roles or text that could forge a turn."""
        if not isinstance(messages, list):
            raise InvalidRequest("messages", "must be a list of {role, content} messages")
        try:
            checked = [ChatMessage.model_validate(m).model_dump() for m in messages]
        except ValidationError as err:
            raise InvalidRequest("messages", _first_error(err)) from None
        if self.chat_template is None:
            raise InvalidRequest("messages", "this model has no chat template; start it with --chat_template")
        check_dialog(checked, self.forbidden_in_messages)
        text = self.tokenizer.apply_chat_template(
            checked, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @cached_property
    def forbidden_in_messages(self) -> tuple[str, ...]:
        """The chat template's turn markers and the tokenizer's special tokens (see predictor/dialogs.py)."""
        return control_strings(self.chat_template, self.tokenizer)

    def sampling_params(self, parameters: dict | None, prompt_len: int) -> SamplingParams:
        """Request parameters over the server defaults; max_new_tokens defaults to what fits the context."""
        parameters = dict(parameters or {})
        if not isinstance(parameters, dict):
            raise InvalidRequest("parameters", "must be an object")
        if parameters.get("max_new_tokens") is None:
            parameters["max_new_tokens"] = max(1, min(self.defaults["max_new_tokens"], self.max_model_len - prompt_len))
        try:
            return SamplingParams(**{**self.defaults, **{k: v for k, v in parameters.items() if v is not None}})
        except ValidationError as err:
            raise InvalidRequest(_first_field(err, "parameters"), err.errors()[0]["msg"]) from None
        except TypeError as err:
            raise InvalidRequest("parameters", str(err)) from None

    def start(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        return self.engine.submit(prompt_ids, params)

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        stream = self.start(prompt_ids, params)
        pieces: list[str] = []
        try:
            async for event in stream:
                if isinstance(event, Delta):
                    pieces.append(event.text)
                elif isinstance(event, Finished):
                    if event.finish_reason == "error":
                        raise RuntimeError(f"generation failed: {event.error}")
                    return Completion("".join(pieces), event.finish_reason, event.prompt_tokens,
                                      event.completion_tokens)
        finally:
            stream.cancel()
        raise RuntimeError("generation ended without a final event")


def _first_field(err: ValidationError, default: str) -> str:
    loc = err.errors()[0]["loc"]
    return ".".join(str(p) for p in loc) or default


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where + ': ' if where else ''}{first['msg']}"
