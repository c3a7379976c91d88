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
Job = tuple[list[int], SamplingParams]


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
        if not payload["instances"]:
            raise InvalidRequest("instances", "must hold at least one instance")
        jobs = [await self._prepare(f"instances.{i}", instance) for i, instance in enumerate(payload["instances"])]
        return {"predictions": await self._complete_all(jobs)}

    async def _prepare(self, where: str, instance) -> Job:
        if not isinstance(instance, dict) or ("prompt" in instance) == ("messages" in instance):
            raise InvalidRequest(where, "each instance needs exactly one of 'prompt' or 'messages'")
        unknown = set(instance) - INSTANCE_FIELDS
        if unknown:
            raise InvalidRequest(where, f"unknown field(s) {sorted(unknown)}")
        if "prompt" in instance:
            prompt_ids = await self.service.encode_prompt(instance["prompt"], f"{where}.prompt")
        else:
            prompt_ids = await self.service.encode_chat(instance["messages"], f"{where}.messages")
        return await self._job(prompt_ids, instance.get("parameters"), f"{where}.parameters")

    async def _job(self, prompt_ids: list[int], parameters, where: str) -> Job:
        params = self.service.sampling_params(parameters, len(prompt_ids))
        await self.service.prepare(params, f"{where}.structured_output")
        return prompt_ids, params

    async def _complete_all(self, jobs: list[Job]) -> list[dict]:
        """Every job is checked (by _prepare or _job) before any starts."""
        return [_prediction(result) for result in await self.service.complete_all(jobs)]

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        index, texts_input = next(((n, i) for n, i in enumerate(request.inputs) if i.name == "text_input"),
                                  (None, None))
        if texts_input is None or texts_input.datatype != "BYTES":
            raise InvalidRequest("inputs", "expected a BYTES input named 'text_input'")
        where = f"inputs.{index}.data"
        if not isinstance(texts_input.data, list) or not texts_input.data:
            raise InvalidRequest(where, "must be a non-empty list of strings, one prompt each")
        parameters = request.parameters or {}
        if not isinstance(parameters, dict):
            raise InvalidRequest("parameters", "must be an object")
        jobs = []
        for i, value in enumerate(texts_input.data):
            prompt_ids = await self.service.encode_prompt(_text(value, f"{where}.{i}"), f"{where}.{i}")
            jobs.append(await self._job(prompt_ids, dict(parameters), "parameters"))
        results = await self._complete_all(jobs)
        output = InferOutput(
            name="text_output", shape=[len(results)], datatype="BYTES", data=[r["generated_text"] for r in results]
        )
        return InferResponse(
            model_name=self.name, infer_outputs=[output], response_id=request.id or str(uuid.uuid4())
        )


def _text(value, field: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidRequest(field, "not valid UTF-8") from None
    if not isinstance(value, str):
        raise InvalidRequest(field, f"must be a string (a BYTES element), not {type(value).__name__}")
    return value


def _prediction(result: GenerationResult) -> dict:
    return {
        "generated_text": result.text,
        "finish_reason": result.finish_reason,
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }
