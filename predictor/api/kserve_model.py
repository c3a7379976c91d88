"""The KServe model: load() builds the generation service; predict() serves V1 (prompt or messages) and V2
(text_input). A bad instance is an InvalidRequest, which predictor/api/app.py answers as a 400 in KServe's
{"error": ...} shape without a traceback in the log."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

import kserve
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from predictor.api.service import GenerationResult, GenerationService, usage
from predictor.engine import InvalidRequest, SamplingParams

logger = logging.getLogger(__name__)

INSTANCE_FIELDS = {"prompt", "messages", "parameters"}


class KServeModel(kserve.Model):
    def __init__(self, name: str, build: Callable[[], GenerationService]):
        super().__init__(name)
        self._build = build
        self.service: GenerationService | None = None

    def load(self) -> bool:
        self.service = self._build()
        self.ready = True
        return self.ready

    async def healthy(self) -> bool:
        return self.ready and self.service is not None and self.service.engine.alive

    async def predict(self, payload, headers=None, response_headers=None):
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload)
        if isinstance(payload, (bytes, str)):  # a JSON body sent without a JSON content-type
            try:
                payload = json.loads(payload)
            except ValueError as err:
                raise InvalidRequest("body", f"not valid JSON: {err}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
            raise InvalidRequest("instances", 'expected {"instances": [{"prompt": ...} | {"messages": [...]}, ...]}')
        return {"predictions": await self._complete_all(payload["instances"], "instances")}

    async def _complete_all(self, instances: list, field: str) -> list[dict]:
        self.service.engine.check_request_size(len(instances), field)
        jobs = [await self._prepare(i, instance) for i, instance in enumerate(instances)]  # all checked first
        return [_prediction(result) for result in await self.service.complete_all(jobs, field)]

    async def _prepare(self, index: int, instance) -> tuple[list[int], SamplingParams]:
        where = f"instances.{index}"
        if not isinstance(instance, dict) or ("prompt" in instance) == ("messages" in instance):
            raise InvalidRequest(where, "each instance needs exactly one of 'prompt' or 'messages'")
        unknown = set(instance) - INSTANCE_FIELDS
        if unknown:
            raise InvalidRequest(where, f"unknown field(s) {sorted(unknown)}")
        if "prompt" in instance:
            prompt_ids = await self.service.encode_prompt(instance["prompt"], f"{where}.prompt")
        else:
            prompt_ids = await self.service.encode_chat(instance["messages"], f"{where}.messages")
        params = self.service.sampling_params(instance.get("parameters"), len(prompt_ids))
        await self.service.prepare(params, f"{where}.parameters.structured_output")
        return prompt_ids, params

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        texts_input = next((i for i in request.inputs if i.name == "text_input"), None)
        if texts_input is None or texts_input.datatype != "BYTES":
            raise InvalidRequest("inputs", "expected a BYTES input named 'text_input'")
        prompts = [_text(t) for t in texts_input.data]
        parameters = request.parameters or {}
        if not isinstance(parameters, dict):
            raise InvalidRequest("parameters", "must be an object")
        results = await self._complete_all([{"prompt": p, "parameters": dict(parameters)} for p in prompts],
                                           "inputs.text_input")
        output = InferOutput(
            name="text_output", shape=[len(results)], datatype="BYTES", data=[r["generated_text"] for r in results]
        )
        return InferResponse(
            model_name=self.name, infer_outputs=[output], response_id=request.id or str(uuid.uuid4())
        )


def _text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidRequest("inputs.text_input", "not valid UTF-8") from None
    return str(value)


def _prediction(result: GenerationResult) -> dict:
    return {
        "generated_text": result.text,
        "finish_reason": result.finish_reason,
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }
