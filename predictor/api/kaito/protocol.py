"""Request and response bodies of Kaito's preset servers (llama-2, llama-2-chat, falcon), with their defaults.

Bounds that sampling also has come from predictor.engine.sampling_params, so they read the same everywhere.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from predictor.api.dialogs import SPECIAL_TAGS_ERROR
from predictor.engine.sampling_params import RepetitionPenalty, Temperature, TopK, TopP, TypicalP

# Kaito's llama servers' defaults for what a request leaves out; max_batch_size's is the one its docs give.
LLAMA_TEMPERATURE = 0.6
LLAMA_TOP_P = 0.9
LLAMA_MAX_BATCH_SIZE = 32


class LlamaParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_seq_len: int | None = Field(
        None, ge=1, description="Prompt + generated tokens, at most the model's max_model_len (the default)."
    )
    max_gen_len: int | None = Field(
        None, ge=1, description="Generated tokens, below the model's max_model_len and cut to what max_seq_len "
        "leaves after the prompt (default: the server's --max_new_tokens).",
    )
    max_batch_size: int = Field(LLAMA_MAX_BATCH_SIZE, ge=1, description="Most prompts or dialogs in one request.")
    temperature: Temperature = LLAMA_TEMPERATURE
    top_p: TopP = LLAMA_TOP_P


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    parameters: LlamaParameters | None = None


class GenerateResult(BaseModel):
    prompt: str
    response: str


class GenerateResponse(BaseModel):
    results: list[GenerateResult]


class DialogMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(description="system (first only), then user and assistant alternating, ending with user.")
    content: str


class LlamaChatInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_string: list[list[DialogMessage]] = Field(min_length=1, description="The dialogs, one reply each.")
    parameters: LlamaParameters | None = None


class LlamaChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_data: LlamaChatInput
    parameters: LlamaParameters | None = Field(
        None, description="Where Kaito's server reads them; input_data.parameters (as in Kaito's docs) works too."
    )


class LlamaChatResponse(BaseModel):
    results: list[list[DialogMessage]] = Field(
        description="Each dialog with the assistant's reply appended (roles capitalised, as Kaito's server does); "
        f"a dialog holding special tags gets {SPECIAL_TAGS_ERROR!r} as its reply."
    )


class FalconChatRequest(BaseModel):
    """transformers' generate() parameters, as Kaito's Falcon server takes them."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    max_length: int = Field(200, ge=1, description="Prompt + generated tokens.")
    min_length: int = Field(0, ge=0, description="Prompt + generated tokens before EOS may end the text.")
    do_sample: bool = Field(True, description="false is greedy.")
    early_stopping: bool = Field(False, description="Beam search only: must be false.")
    num_beams: int = Field(1, ge=1, description="Beam search is not supported: must be 1.")
    num_beam_groups: int = Field(1, ge=1, description="Beam search only: must be 1.")
    diversity_penalty: float = Field(0.0, description="Beam search only: must be 0.")
    temperature: Temperature = 1.0
    top_k: TopK = 10
    top_p: TopP = 1.0
    typical_p: TypicalP = 1.0
    repetition_penalty: RepetitionPenalty = 1.0
    length_penalty: float = Field(1.0, description="Beam search only: must be 1.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Not supported: must be 0.")
    encoder_no_repeat_ngram_size: int = Field(0, ge=0, description="Encoder-decoder models only: must be 0.")
    bad_words_ids: list[list[int]] | list[int] | None = Field(None, description="Not supported: must be null.")
    num_return_sequences: int = Field(1, ge=1, description="One sequence per request: must be 1.")
    output_scores: bool = Field(False, description="The response holds text only: must be false.")
    return_dict_in_generate: bool = Field(False, description="The response holds text only: must be false.")
    pad_token_id: int | None = Field(None, ge=0, strict=True,
                                     description="No effect: a single sequence is never padded.")
    eos_token_id: int | None = Field(None, ge=0, strict=True, description="Ends the text instead of the model's EOS.")
    forced_bos_token_id: int | None = Field(None, description="Not supported: must be null.")
    forced_eos_token_id: int | None = Field(None, description="Not supported: must be null.")
    remove_invalid_values: bool | None = Field(None, description="Not supported: must be null or false.")


class FalconChatResponse(BaseModel):
    Result: str = Field(description="The prompt followed by the generated text, as transformers' pipeline gives it.")


def _chat_form(body) -> str | None:
    if isinstance(body, LlamaChatRequest) or isinstance(body, dict) and "input_data" in body:
        return "llama"
    if isinstance(body, FalconChatRequest) or isinstance(body, dict) and "prompt" in body:
        return "falcon"
    return None


ChatRequest = Annotated[
    Annotated[LlamaChatRequest, Tag("llama")] | Annotated[FalconChatRequest, Tag("falcon")],
    Discriminator(
        _chat_form, custom_error_type="chat_form",
        custom_error_message='expected the Llama form {"input_data": ...} or the Falcon form {"prompt": ...}',
    ),
]

BEAMS_REFUSED = "beam search is not supported"
# Falcon parameters the engine has no counterpart for: only their no-op values pass.
FALCON_NO_OP_ONLY: dict[str, tuple[tuple, str]] = {
    "num_beams": ((1,), BEAMS_REFUSED),
    "num_beam_groups": ((1,), BEAMS_REFUSED),
    "early_stopping": ((False,), BEAMS_REFUSED),
    "diversity_penalty": ((0.0,), BEAMS_REFUSED),
    "length_penalty": ((1.0,), BEAMS_REFUSED),
    "no_repeat_ngram_size": ((0,), "n-gram blocking is not supported"),
    "encoder_no_repeat_ngram_size": ((0,), "applies to encoder-decoder models only"),
    "bad_words_ids": ((None, []), "word blocking is not supported"),
    "num_return_sequences": ((1,), "one sequence per request; send the request again for another"),
    "output_scores": ((False,), "the response holds text only"),
    "return_dict_in_generate": ((False,), "the response holds text only"),
    "forced_bos_token_id": ((None,), "forcing tokens is not supported"),
    "forced_eos_token_id": ((None,), "forcing tokens is not supported"),
    "remove_invalid_values": ((None, False), "not supported"),
}
