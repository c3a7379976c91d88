"""What one request asks of generation, with every bound declared once.

The bounded types below are what the front-ends reuse for their own request bodies, so a value refused on one
route is refused on all of them with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

INT64_MAX = 2**63 - 1  # what the sampler's tensors hold
Temperature = Annotated[float, Field(ge=0.0, le=100.0, description="0 means greedy.")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0, le=INT64_MAX, description="0 disables top-k; at least the vocabulary keeps all.")]
TypicalP = Annotated[float, Field(gt=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=100.0)]
PresencePenalty = Annotated[float, Field(ge=-2.0, le=2.0, description="OpenAI's: subtracted once per seen token.")]
FrequencyPenalty = Annotated[float, Field(ge=-2.0, le=2.0, description="OpenAI's: subtracted per occurrence.")]
Seed = Annotated[int, Field(ge=0, le=INT64_MAX)]
# Strict: JSON true and 1.0 are not token ids (pydantic's lax mode would take both as 1).
TokenId = Annotated[StrictInt, Field(ge=0)]
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20


class StructuredOutput(BaseModel):
    """The output must be JSON that validates against json_schema; {"type": "object"} is any JSON object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict


class SamplingParams(BaseModel):
    """Bounds are checked here so bad input is a 400 naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    typical_p: TypicalP = 1.0
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: PresencePenalty = 0.0
    frequency_penalty: FrequencyPenalty = 0.0
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives to report per token.")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    seed: Seed | None = None
    structured_output: StructuredOutput | None = Field(
        None, description="Held to a grammar: it ends when the JSON is complete, whatever min_new_tokens or "
                          "ignore_eos say (only a complete JSON may take EOS).")

    @field_validator("min_new_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        most = info.data.get("max_new_tokens")
        if most is not None and value > most:
            raise PydanticCustomError("min_above_max", "must be <= max_new_tokens ({most})", {"most": most})
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class TokenLogprob:
    """A chosen token's log-probability under the model, with the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
