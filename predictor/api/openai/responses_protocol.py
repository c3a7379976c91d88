"""The request body of OpenAI's Responses API (POST /openai/v1/responses), as far as a stateless text server can
honour it. Every field is honoured, accepted or refused by name, as on the other OpenAI routes: what is not
declared here is refused by extra="forbid"; what needs tools, stored responses, background jobs, reasoning or
non-text input is declared only to refuse it with the reason. vLLM's sampling extras that benchmark clients send
(guidellm: ignore_eos, stop) are honoured as vLLM does. The README's Responses table lists them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from predictor.api.openai.protocol import JsonSchema, ResponseFormat
from predictor.engine.sampling_params import RepetitionPenalty, Seed, TopK

NOT_STORED = "this server stores no responses: send the whole conversation as input"
REFUSED = {
    "previous_response_id": NOT_STORED,
    "conversation": NOT_STORED,
    "background": "background responses are not supported (nothing is stored to fetch them from)",
    "tools": "tool calling is not supported by this server",
    "tool_choice": "tool calling is not supported by this server",
    "max_tool_calls": "tool calling is not supported by this server",
    "reasoning": "reasoning options are not supported: the served model does not reason separately",
    "include": "no additional output data (include) is available",
    "prompt": "stored prompt templates are not supported: give input and instructions",
    "top_logprobs": "log-probabilities are not served on the Responses API (the chat route has logprobs)",
}
ROLES_AS_CHAT = {"developer": "system"}  # the chat template knows system, user and assistant


def text_or(items: Any, name: str) -> Any:
    """A string or a list of items, told apart by type, so that an error names the branch that was meant (a bad
    part of a list is reported as such, not as "should be a valid string")."""
    return Annotated[Annotated[str, Tag("text")] | Annotated[items, Tag(name)],
                     Discriminator(lambda value: "text" if isinstance(value, str) else name)]


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text"]
    text: str


class OutputText(BaseModel):
    """An earlier answer's text, sent back as part of the conversation."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["output_text"]
    text: str
    annotations: list[Any] = Field(default_factory=list, description="Accepted; not used.")
    logprobs: list[Any] | None = Field(None, description="Accepted; not used.")


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: text_or(list[Annotated[InputText | OutputText, Field(discriminator="type")]], "parts")
    id: str | None = Field(None, description="Accepted (an earlier output item's); not used.")
    status: Literal["in_progress", "completed", "incomplete"] | None = Field(None, description="Accepted; not used.")

    def chat_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": ROLES_AS_CHAT.get(self.role, self.role), "content": text}


class TextFormat(BaseModel):
    """text.format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema", "name", "schema", ...}."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.name is not None and self.json_schema is not None):
            raise PydanticCustomError("text_format", "name and schema are given with, and only with, type "
                                                     "json_schema")
        if self.type != "json_schema" and (self.json_schema, self.description, self.strict) != (None, None, None):
            raise PydanticCustomError("text_format", "schema, description and strict go with type json_schema")
        return self

    def response_format(self) -> ResponseFormat:
        """The chat route's response_format for the same output."""
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        return ResponseFormat(type="json_schema", json_schema=JsonSchema(
            name=self.name, description=self.description, json_schema=self.json_schema, strict=self.strict))


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(None, description='Only "medium" (no effect) is accepted.')


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: text_or(list[InputMessage], "messages") = Field(
        description="A user message's text, or the conversation's messages.")
    instructions: str | None = Field(None, description="A system message before the input.")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = Field(False, strict=True)
    text: TextConfig | None = None
    store: bool | None = Field(None, description="Accepted; nothing is stored, whatever it says (as vLLM does "
                                                 "without its response store).")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Echoed in the response.")
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = Field(None, description="Accepted; not used.")
    truncation: Literal["disabled"] | None = Field(None, description='Only "disabled": a prompt longer than the '
                                                                     "context is a 400.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted; no tools are ever called.")
    seed: Seed | None = Field(None, description="vLLM's: a sampled answer is reproducible.")
    stop: str | list[str] | None = Field(None, description="vLLM's: stop strings.")
    ignore_eos: bool = Field(False, strict=True, description="vLLM's: generate max_output_tokens, EOS or not.")
    top_k: TopK | None = Field(None, description="vLLM's: 0 is off.")
    repetition_penalty: RepetitionPenalty | None = Field(None, description="vLLM's.")
    previous_response_id: Any = Field(None, description="Refused: " + NOT_STORED)
    conversation: Any = Field(None, description="Refused: " + NOT_STORED)
    background: bool | None = Field(None, description="Refused when true.")
    tools: list[Any] | None = Field(None, description="Refused unless empty: " + REFUSED["tools"])
    tool_choice: Any = Field(None, description='Refused, but for "none".')
    max_tool_calls: Any = Field(None, description="Refused.")
    reasoning: Any = Field(None, description="Refused.")
    include: list[Any] | None = Field(None, description="Refused unless empty.")
    prompt: Any = Field(None, description="Refused.")
    top_logprobs: Any = Field(None, description="Refused.")

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, value, info):
        if value in (None, False, [], "none"):
            return value
        raise PydanticCustomError("not_supported", REFUSED[info.field_name])

    def input_messages(self) -> list[dict[str, str]]:
        """The input as chat messages (a string is one user message)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [message.chat_message() for message in self.input]

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages: the instructions as its system message, then the input."""
        given = self.input_messages()
        if self.instructions is None:
            return given
        if given and given[0]["role"] == "system":  # one system message: the instructions, then the input's
            return [{"role": "system", "content": f"{self.instructions}\n\n{given[0]['content']}"}, *given[1:]]
        return [{"role": "system", "content": self.instructions}, *given]

    def response_format(self) -> ResponseFormat | None:
        return self.text.format.response_format() if self.text and self.text.format else None
