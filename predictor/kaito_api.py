"""Kaito-compatible routes: GET / and /healthz, POST /shutdown, /generate and /chat (Llama and Falcon forms).

Shapes and defaults follow Kaito's preset servers (presets/llama-2, llama-2-chat and falcon inference APIs):
/generate answers {"results": [{"prompt", "response"}]}, Llama /chat answers {"results": [dialog + reply]} with
capitalised roles, Falcon /chat answers {"Result": prompt + generated text}. Every parameter those servers take
is honoured or refused with a 400 naming it; the engine does no beam search, so beam parameters are refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from typing import Annotated

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from predictor.dialogs import SPECIAL_TAGS_ERROR, SpecialTagsNotAllowed
from predictor.disconnect import until_disconnected
from predictor.engine import Engine, EngineUnavailable, InvalidRequest, SamplingParams
from predictor.generation import Completion, TextGenerator
from predictor.model import LLMModel

logger = logging.getLogger(__name__)

DEVICE_CHECK_TIMEOUT_S = 5.0
# Kaito's llama servers' defaults for what a request leaves out; max_batch_size's is the one its docs give.
LLAMA_TEMPERATURE = 0.6
LLAMA_TOP_P = 0.9
LLAMA_MAX_BATCH_SIZE = 32


# ---- request and response bodies ---------------------------------------------------------------------------


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
    temperature: float = Field(LLAMA_TEMPERATURE, ge=0.0, le=100.0, description="0 is greedy.")
    top_p: float = Field(LLAMA_TOP_P, gt=0.0, le=1.0)


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
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_k: int = Field(10, ge=0, description="0 disables top-k.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    length_penalty: float = Field(1.0, description="Beam search only: must be 1.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Not supported: must be 0.")
    encoder_no_repeat_ngram_size: int = Field(0, ge=0, description="Encoder-decoder models only: must be 0.")
    bad_words_ids: list[list[int]] | list[int] | None = Field(None, description="Not supported: must be null.")
    num_return_sequences: int = Field(1, ge=1, description="One sequence per request: must be 1.")
    output_scores: bool = Field(False, description="The response holds text only: must be false.")
    return_dict_in_generate: bool = Field(False, description="The response holds text only: must be false.")
    pad_token_id: int | None = Field(None, ge=0, description="No effect: a single sequence is never padded.")
    eos_token_id: int | None = Field(None, ge=0, description="Ends the text instead of the model's EOS.")
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


# ---- routes ------------------------------------------------------------------------------------------------


def kaito_router(model: LLMModel, enable_shutdown: bool) -> APIRouter:
    router = APIRouter(tags=["kaito"])
    shutdown = _Shutdown()

    def ready() -> TextGenerator:
        if not model.ready or model.generator is None:
            raise EngineUnavailable(f"model {model.name} is still loading")
        return model.generator

    @router.get("/")
    async def home() -> dict:
        return {"status": "Server is running"}

    @router.get("/healthz", responses={503: {"description": "loading, engine failed, shutting down, bad device"}})
    async def healthz():
        problem = await _health_problem(model, shutdown.started)
        if problem:
            return JSONResponse({"status": "Unhealthy", "reason": problem}, status_code=503)
        return {"status": "Healthy"}

    @router.post("/shutdown", responses={403: {"description": "not enabled (--enable_shutdown)"}})
    async def shutdown_server():
        if not enable_shutdown:
            return _error(403, "POST /shutdown is disabled; start the server with --enable_shutdown to allow it",
                          "enable_shutdown")
        shutdown.start(ready().engine)
        return {"status": "shutting down"}

    @router.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
        generator = ready()
        budget = _budget(generator, body.parameters or LlamaParameters(), "parameters", len(body.prompts), "prompts")
        jobs = []
        for index, prompt in enumerate(body.prompts):
            prompt_ids = generator.encode_prompt(prompt)
            jobs.append((prompt_ids, budget.sampling(generator, prompt_ids, f"prompts.{index}")))
        completions = await until_disconnected(request, _complete_all(generator, jobs))
        return GenerateResponse(results=[GenerateResult(prompt=p, response=c.text)
                                         for p, c in zip(body.prompts, completions)])

    @router.post("/chat", response_model=LlamaChatResponse | FalconChatResponse)
    async def chat(body: ChatRequest, request: Request) -> LlamaChatResponse | FalconChatResponse:
        generator = ready()
        if isinstance(body, FalconChatRequest):
            return await _falcon_chat(generator, body, request)
        return await _llama_chat(generator, body, request)

    return router


async def _llama_chat(generator: TextGenerator, body: LlamaChatRequest, request: Request) -> LlamaChatResponse:
    parameters, where = _llama_parameters(body)
    dialogs = body.input_data.input_string
    budget = _budget(generator, parameters, where, len(dialogs), "input_data.input_string")
    jobs: list[tuple[list[int], SamplingParams] | None] = []  # None: refused for special tags, not generated
    for index, dialog in enumerate(dialogs):
        field = f"input_data.input_string.{index}"
        try:
            prompt_ids = generator.encode_chat([message.model_dump() for message in dialog])
        except SpecialTagsNotAllowed:
            jobs.append(None)
            continue
        except InvalidRequest as err:
            raise _renamed(err, field) from None
        jobs.append((prompt_ids, budget.sampling(generator, prompt_ids, field)))
    completions = iter(await until_disconnected(request, _complete_all(generator, [j for j in jobs if j is not None])))
    results = []
    for dialog, job in zip(dialogs, jobs):
        reply = SPECIAL_TAGS_ERROR if job is None else next(completions).text
        echoed = [DialogMessage(role=m.role.capitalize(), content=m.content) for m in dialog]
        results.append([*echoed, DialogMessage(role="Assistant", content=reply)])
    return LlamaChatResponse(results=results)


async def _falcon_chat(generator: TextGenerator, body: FalconChatRequest, request: Request) -> FalconChatResponse:
    _refuse_unsupported(body)
    prompt_ids = generator.encode_prompt(body.prompt)
    params = generator.sampling_params(_falcon_sampling(generator, body, len(prompt_ids)), len(prompt_ids))
    (completion,) = await until_disconnected(request, _complete_all(generator, [(prompt_ids, params)]))
    return FalconChatResponse(Result=body.prompt + completion.text)


def _refuse_unsupported(body: FalconChatRequest) -> None:
    for name, (no_ops, reason) in FALCON_NO_OP_ONLY.items():
        value = getattr(body, name)
        if value not in no_ops:
            allowed = " or ".join("null" if v is None else repr(v).lower() for v in no_ops)
            raise InvalidRequest(name, f"{reason}: must be {allowed} (got {value!r})")


def _falcon_sampling(generator: TextGenerator, body: FalconChatRequest, prompt_len: int) -> dict:
    """transformers' lengths count the prompt; the engine's count generated tokens."""
    if body.max_length > generator.max_model_len:
        raise InvalidRequest("max_length", f"must be <= {generator.max_model_len}, the model's max_model_len")
    if body.max_length <= prompt_len:
        raise InvalidRequest("max_length", f"the prompt is {prompt_len} tokens, so max_length ({body.max_length}) "
                             "leaves no room to generate")
    if body.min_length > body.max_length:
        raise InvalidRequest("min_length", f"must be <= max_length ({body.max_length})")
    if body.eos_token_id is not None and body.eos_token_id >= len(generator.tokenizer):
        raise InvalidRequest("eos_token_id", f"must be < the vocabulary size ({len(generator.tokenizer)})")
    sampling = {
        "max_new_tokens": body.max_length - prompt_len,
        "min_new_tokens": max(0, body.min_length - prompt_len),
        "temperature": body.temperature if body.do_sample else 0.0,
        "top_k": body.top_k,
        "top_p": body.top_p,
        "typical_p": body.typical_p,
        "repetition_penalty": body.repetition_penalty,
    }
    if body.eos_token_id is not None:
        sampling.update(ignore_eos=True, stop_token_ids=[body.eos_token_id])
    return sampling


# ---- limits --------------------------------------------------------------------------------------------------


@dataclass
class _Budget:
    """One request's Llama parameters, checked against the server's limits."""

    max_seq_len: int
    max_gen_len: int
    temperature: float
    top_p: float

    def sampling(self, generator: TextGenerator, prompt_ids: list[int], field: str) -> SamplingParams:
        room = self.max_seq_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(field, f"is {len(prompt_ids)} tokens, which leaves no room to generate within "
                                 f"max_seq_len ({self.max_seq_len})")
        wanted = {"max_new_tokens": min(self.max_gen_len, room), "temperature": self.temperature, "top_p": self.top_p}
        return generator.sampling_params(wanted, len(prompt_ids))


def _budget(generator: TextGenerator, parameters: LlamaParameters, where: str, count: int, items: str) -> _Budget:
    max_model_len = generator.max_model_len
    max_seq_len = parameters.max_seq_len or max_model_len
    if max_seq_len > max_model_len:
        raise InvalidRequest(f"{where}.max_seq_len", f"must be <= {max_model_len}, the model's max_model_len")
    if parameters.max_gen_len is not None and parameters.max_gen_len >= max_model_len:
        raise InvalidRequest(f"{where}.max_gen_len", f"must be < {max_model_len}, the model's max_model_len, "
                             "which also holds the prompt")
    max_queue = max(1, generator.engine.max_queue)
    if "max_batch_size" in parameters.model_fields_set and parameters.max_batch_size > max_queue:
        raise InvalidRequest(f"{where}.max_batch_size", f"must be <= {max_queue}, the server's --max_queue")
    if count > parameters.max_batch_size:
        raise InvalidRequest(items, f"holds {count}, more than max_batch_size ({parameters.max_batch_size})")
    max_gen_len = parameters.max_gen_len or generator.defaults["max_new_tokens"]
    return _Budget(max_seq_len, max_gen_len, parameters.temperature, parameters.top_p)


def _llama_parameters(body: LlamaChatRequest) -> tuple[LlamaParameters, str]:
    """Kaito's server reads top-level parameters, its docs put them in input_data: take either, not both."""
    top, inner = body.parameters, body.input_data.parameters
    if top is not None and inner is not None:
        raise InvalidRequest("parameters", "given twice: send them at the top level or in input_data, not both")
    if inner is not None:
        return inner, "input_data.parameters"
    return top or LlamaParameters(), "parameters"


def _renamed(err: InvalidRequest, field: str) -> InvalidRequest:
    detail = str(err).removeprefix(f"{err.field}: ")
    return InvalidRequest(field, detail)


# ---- generation ----------------------------------------------------------------------------------------------


async def _complete_all(generator: TextGenerator, jobs: list[tuple[list[int], SamplingParams]]) -> list[Completion]:
    tasks = [asyncio.ensure_future(generator.complete(ids, params)) for ids, params in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one failure (a full queue, say) or a cancelled request cancels the rest, freeing their KV slots
        for task in tasks:
            task.cancel()


# ---- health and shutdown -------------------------------------------------------------------------------------


async def _health_problem(model: LLMModel, shutting_down: bool) -> str | None:
    generator = model.generator
    if not model.ready or generator is None:
        return "model is loading"
    engine = generator.engine
    if not engine.alive:  # a dead tensor-parallel rank fails rank 0's next collective, which ends the engine
        return f"engine failed: {engine.error or 'stopped'}"
    if shutting_down:
        return "shutting down"
    return await _device_problem(engine.runner.device)


async def _device_problem(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "device: CUDA is not available"
    try:
        await asyncio.wait_for(asyncio.to_thread(_tiny_tensor_op, device), DEVICE_CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"device: {device} did not answer within {DEVICE_CHECK_TIMEOUT_S:g}s"
    except Exception as err:  # noqa: BLE001 - any failure means the device is unusable
        return f"device: {device} is unusable: {err}"
    return None


def _tiny_tensor_op(device: torch.device) -> None:
    if (torch.ones(2, device=device) * 2).sum().item() != 4.0:
        raise RuntimeError("wrong arithmetic result")


class _Shutdown:
    """Drain the engine (new work gets 503, queued and running work finishes), then stop the server.

    SIGTERM to ourselves is what triggers uvicorn's (and so KServe's) graceful stop; serve() then stops the
    engine and tells the other tensor-parallel ranks to stop, and every process exits 0.
    """

    def __init__(self):
        self.task: asyncio.Task | None = None

    @property
    def started(self) -> bool:
        return self.task is not None

    def start(self, engine: Engine) -> None:
        if self.task is None:
            engine.begin_drain()
            self.task = asyncio.create_task(self._stop_when_drained(engine))

    @staticmethod
    async def _stop_when_drained(engine: Engine) -> None:
        logger.info("shutdown requested: draining")
        await engine.drained()
        logger.info("drained: stopping the server")
        os.kill(os.getpid(), signal.SIGTERM)


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    kind = {403: "permission_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)
