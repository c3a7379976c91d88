"""Request bodies of the OpenAI-compatible routes. Responses use the openai package's own types.

Every field OpenAI defines is either honoured or refused: unknown fields (logit_bias, suffix, ...) are rejected by
extra="forbid", tool calling by its own message, and predictor/api/app.py turns that into a 400 naming the field.
The README's field table lists what is honoured, accepted and refused.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from predictor.engine.sampling_params import MAX_STOP_TOKEN_IDS, TokenId
from predictor.engine.structured_output import ANY_JSON_OBJECT

MAX_CHOICES = 16
MAX_PROMPTS = 256
NO_TOOLS = "tool calling is not supported by this server: leave out tools, tool_choice, functions and function_call"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(None, strict=True)
    continuous_usage_stats: bool = Field(False, strict=True, description="vLLM's: usage on every chunk.")

    @property
    def usage_at_end(self) -> bool:
        """As in vLLM, continuous_usage_stats implies include_usage unless that is false."""
        return self.include_usage if self.include_usage is not None else self.continuous_usage_stats

    @property
    def usage_on_every_chunk(self) -> bool:
        return self.continuous_usage_stats and self.usage_at_end


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="None: any JSON object.")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError("json_schema", "json_schema is given with, and only with, type json_schema")
        return self

    def json_schema_wanted(self) -> dict | None:
        """The JSON schema the output must match; {"type": "object"} for json_object, None for text."""
        if self.type == "text":
            return None
        return (self.json_schema and self.json_schema.json_schema) or ANY_JSON_OBJECT


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = Field(False, strict=True)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    response_format: ResponseFormat | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    user: str | None = None
    tools: Any = Field(None, description="Refused: tool calling is not supported.")
    tool_choice: Any = Field(None, description='Refused, but for "none".')
    functions: Any = Field(None, description="Refused: tool calling is not supported.")
    function_call: Any = Field(None, description='Refused, but for "none".')
    parallel_tool_calls: bool | None = Field(None, description="Accepted; no tools are ever called.")

    @field_validator("tools", "tool_choice", "functions", "function_call")
    @classmethod
    def _no_tool_calls(cls, value):
        if value not in (None, "none"):
            raise PydanticCustomError("tool_calls", NO_TOOLS)
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.usage_at_end)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.usage_on_every_chunk)

    def structured_output(self) -> dict | None:
        schema = self.response_format and self.response_format.json_schema_wanted()
        return {"json_schema": schema} if schema else None

    def top_logprobs_wanted(self) -> int | None:
        return None

    def engine_names(self) -> dict[str, str]:
        """This request's name for each engine parameter whose name differs, so that errors name OpenAI's field."""
        return {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "structured_output": "response_format"}

    def sampling(self, choice: int) -> dict:
        """Engine parameters of the choice-th of n samples (each gets its own seed so they differ)."""
        return {
            "max_new_tokens": self.max_tokens, "min_new_tokens": self.min_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "stop": self.stop or [], "seed": None if self.seed is None else (self.seed + choice) % 2**63,
            "ignore_eos": self.ignore_eos, "logprobs": self.top_logprobs_wanted(),
            "stop_token_ids": self.stop_token_ids, "structured_output": self.structured_output(),
        }


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="Text, texts, token ids, or lists of token ids."
    )
    echo: bool = Field(False, strict=True)
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt", mode="before")
    @classmethod
    def _integer_token_ids(cls, prompt):
        return integer_token_ids(prompt)

    @model_validator(mode="after")
    def _echo_without_logprobs(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (prompt logprobs) is not supported")
        return self

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _one_token_limit(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        self.max_tokens = self.max_tokens or self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def engine_names(self) -> dict[str, str]:
        given = "max_completion_tokens" if "max_completion_tokens" in self.model_fields_set else "max_tokens"
        return {**super().engine_names(), "max_new_tokens": given}


def integer_token_ids(value):
    """Refuse, by name, token ids given as JSON true or 1.0, which pydantic's lax mode would take as id 1 (the
    strict TokenId type refuses them too, but in a union its message would be about strings)."""
    if isinstance(value, list):
        for item in value:
            for token in item if isinstance(item, list) else [item]:
                if isinstance(token, (bool, float)):
                    raise PydanticCustomError("token_id", "token ids must be integers, not {token}",
                                              {"token": json.dumps(token)})
    return value
