"""Kaito-compatible /generate and /chat (Llama and Falcon forms); Kaito's /, /healthz and /shutdown are in
predictor/api/health.py.

Shapes and defaults follow Kaito's preset servers (presets/llama-2, llama-2-chat and falcon inference APIs):
/generate answers {"results": [{"prompt", "response"}]}, Llama /chat answers {"results": [dialog + reply]} with
capitalised roles, Falcon /chat answers {"Result": prompt + generated text}. Every parameter those servers take
is honoured or refused with a 400 naming it; the engine does no beam search, so beam parameters are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter

from predictor.api.dialogs import SPECIAL_TAGS_ERROR, SpecialTagsNotAllowed
from predictor.api.json_bodies import ParsedBodyRoute
from predictor.api.kaito.protocol import (
    FALCON_NO_OP_ONLY,
    ChatRequest,
    DialogMessage,
    FalconChatRequest,
    FalconChatResponse,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    LlamaChatRequest,
    LlamaChatResponse,
    LlamaParameters,
)
from predictor.api.service import GenerationService, ServedModel
from predictor.engine import InvalidRequest, SamplingParams


def kaito_router(served: ServedModel) -> APIRouter:
    router = APIRouter(tags=["kaito"], route_class=ParsedBodyRoute)

    @router.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest) -> GenerateResponse:
        service = served.ready()
        budget = _budget(service, body.parameters or LlamaParameters(), "parameters", len(body.prompts), "prompts")
        jobs = []
        for index, prompt in enumerate(body.prompts):
            prompt_ids = await service.encode_prompt(prompt, f"prompts.{index}")
            jobs.append((prompt_ids, budget.sampling(service, prompt_ids, f"prompts.{index}")))
        results = await service.complete_all(jobs, "prompts")
        return GenerateResponse(results=[GenerateResult(prompt=p, response=r.text)
                                         for p, r in zip(body.prompts, results)])

    @router.post("/chat", response_model=LlamaChatResponse | FalconChatResponse)
    async def chat(body: ChatRequest) -> LlamaChatResponse | FalconChatResponse:
        service = served.ready()
        if isinstance(body, FalconChatRequest):
            return await _falcon_chat(service, body)
        return await _llama_chat(service, body)

    return router


async def _llama_chat(service: GenerationService, body: LlamaChatRequest) -> LlamaChatResponse:
    parameters, where = _llama_parameters(body)
    dialogs = body.input_data.input_string
    budget = _budget(service, parameters, where, len(dialogs), "input_data.input_string")
    jobs: list[tuple[list[int], SamplingParams] | None] = []  # None: refused for special tags, not generated
    for index, dialog in enumerate(dialogs):
        field = f"input_data.input_string.{index}"
        try:
            prompt_ids = await service.encode_chat([message.model_dump() for message in dialog], field)
        except SpecialTagsNotAllowed:
            jobs.append(None)
            continue
        except InvalidRequest as err:
            raise _renamed(err, field) from None
        jobs.append((prompt_ids, budget.sampling(service, prompt_ids, field)))
    completions = iter(await service.complete_all([job for job in jobs if job is not None], "input_data.input_string"))
    results = []
    for dialog, job in zip(dialogs, jobs):
        reply = SPECIAL_TAGS_ERROR if job is None else next(completions).text
        echoed = [DialogMessage(role=m.role.capitalize(), content=m.content) for m in dialog]
        results.append([*echoed, DialogMessage(role="Assistant", content=reply)])
    return LlamaChatResponse(results=results)


async def _falcon_chat(service: GenerationService, body: FalconChatRequest) -> FalconChatResponse:
    _refuse_unsupported(body)
    prompt_ids = await service.encode_prompt(body.prompt)
    params = service.sampling_params(_falcon_sampling(service, body, len(prompt_ids)), len(prompt_ids))
    result = await service.complete(prompt_ids, params)
    return FalconChatResponse(Result=body.prompt + result.text)


def _refuse_unsupported(body: FalconChatRequest) -> None:
    for name, (no_ops, reason) in FALCON_NO_OP_ONLY.items():
        value = getattr(body, name)
        if value not in no_ops:
            allowed = " or ".join("null" if v is None else repr(v).lower() for v in no_ops)
            raise InvalidRequest(name, f"{reason}: must be {allowed} (got {value!r})")


def _falcon_sampling(service: GenerationService, body: FalconChatRequest, prompt_len: int) -> dict:
    """transformers' lengths count the prompt; the engine's count generated tokens."""
    if body.max_length > service.max_model_len:
        raise InvalidRequest("max_length", f"must be <= {service.max_model_len}, the model's max_model_len")
    if body.max_length <= prompt_len:
        raise InvalidRequest("max_length", f"the prompt is {prompt_len} tokens, so max_length ({body.max_length}) "
                             "leaves no room to generate")
    if body.min_length > body.max_length:
        raise InvalidRequest("min_length", f"must be <= max_length ({body.max_length})")
    if body.eos_token_id is not None and body.eos_token_id >= len(service.tokenizer):
        raise InvalidRequest("eos_token_id", f"must be < the vocabulary size ({len(service.tokenizer)})")
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
class LlamaBudget:
    """One request's Llama parameters, checked against the server's limits."""

    max_seq_len: int
    max_gen_len: int
    temperature: float
    top_p: float

    def sampling(self, service: GenerationService, prompt_ids: list[int], field: str) -> SamplingParams:
        room = self.max_seq_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(field, f"is {len(prompt_ids)} tokens, which leaves no room to generate within "
                                 f"max_seq_len ({self.max_seq_len})")
        wanted = {"max_new_tokens": min(self.max_gen_len, room), "temperature": self.temperature, "top_p": self.top_p}
        return service.sampling_params(wanted, len(prompt_ids))


def _budget(service: GenerationService, parameters: LlamaParameters, where: str, count: int, items: str) -> LlamaBudget:
    max_model_len = service.max_model_len
    max_seq_len = parameters.max_seq_len or max_model_len
    if max_seq_len > max_model_len:
        raise InvalidRequest(f"{where}.max_seq_len", f"must be <= {max_model_len}, the model's max_model_len")
    if parameters.max_gen_len is not None and parameters.max_gen_len >= max_model_len:
        raise InvalidRequest(f"{where}.max_gen_len", f"must be < {max_model_len}, the model's max_model_len, "
                             "which also holds the prompt")
    max_queue = max(1, service.engine.max_queue)
    if "max_batch_size" in parameters.model_fields_set and parameters.max_batch_size > max_queue:
        raise InvalidRequest(f"{where}.max_batch_size", f"must be <= {max_queue}, the server's --max_queue")
    if count > parameters.max_batch_size:
        raise InvalidRequest(items, f"holds {count}, more than max_batch_size ({parameters.max_batch_size})")
    max_gen_len = parameters.max_gen_len or service.defaults["max_new_tokens"]
    return LlamaBudget(max_seq_len, max_gen_len, parameters.temperature, parameters.top_p)


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
