"""The KServe model: load() builds the generation service; predict() serves V1 (prompt or messages) and V2
(text_input). A bad instance is an InvalidRequest, which predictor/api/app.py answers as a 400 in KServe's
{"error": ...} shape without a traceback in the log."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable

import kserve
from kserve.model_repository import ModelRepository
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from predictor.api.service import GenerationResult, GenerationService, usage
from predictor.engine import InvalidRequest, SamplingParams

logger = logging.getLogger(__name__)

INSTANCE_FIELDS = {"prompt", "messages", "parameters"}
Job = tuple[list[int], SamplingParams]


class KServeModel(kserve.Model):
    """Loading (service None), then ready; KServe's model repository may unload it (it stops taking requests,
    the weights stay loaded) and load it again (it serves again at once)."""

    def __init__(self, name: str, build: Callable[[], GenerationService]):
        super().__init__(name)
        self._build = build
        self._building = threading.Lock()  # held for good by the one call that builds
        self.service: GenerationService | None = None
        self.unloaded = False

    def load(self) -> bool:
        """Build the service (the load thread, once). KServe's data plane also calls load() on a model that is not
        ready: that call must neither build a second copy nor block the event loop, so it only says if ready."""
        if self._building.acquire(blocking=False):
            self.service = self._build()
        self.ready = self.service is not None and not self.unloaded
        return self.ready

    def stop(self) -> None:
        """KServe's unload: requests in flight finish, new ones get 503, readiness is 503 'model is unloaded'."""
        self.unloaded = True
        self.ready = False

    def serve_again(self) -> None:
        """KServe's load after an unload."""
        self.unloaded = False
        self.ready = self.service is not None

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
        instances = payload["instances"]
        if not instances:
            raise InvalidRequest("instances", "must hold at least one instance")
        self.service.engine.check_request_size(len(instances), "instances")
        jobs = [await self._prepare(f"instances.{i}", instance) for i, instance in enumerate(instances)]
        return {"predictions": await self._complete_all(jobs, "instances")}

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

    async def _complete_all(self, jobs: list[Job], field: str) -> list[dict]:
        """Every job is checked (by _prepare or _job) before any starts; all are queued, or none."""
        return [_prediction(result) for result in await self.service.complete_all(jobs, field)]

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
        self.service.engine.check_request_size(len(texts_input.data), where)
        jobs = []
        for i, value in enumerate(texts_input.data):
            prompt_ids = await self.service.encode_prompt(_text(value, f"{where}.{i}"), f"{where}.{i}")
            jobs.append(await self._job(prompt_ids, dict(parameters), "parameters"))
        results = await self._complete_all(jobs, where)
        output = InferOutput(
            name="text_output", shape=[len(results)], datatype="BYTES", data=[r["generated_text"] for r in results]
        )
        return InferResponse(
            model_name=self.name, infer_outputs=[output], response_id=request.id or str(uuid.uuid4())
        )


class OneModelRepository(ModelRepository):
    """KServe's model repository (POST /v2/repository/models/{name}/load, /unload) over the one model served.

    KServe's own would forget an unloaded model, and its load() does nothing: once unloaded, a model could never
    be loaded again. Here unload stops serving the model and load serves it again, the weights having stayed
    loaded (so unloading frees no memory: it takes the model out of service).
    """

    def __init__(self, model: KServeModel):
        super().__init__()
        self.model = model
        self.update(model)

    def load(self, name: str) -> bool:
        self._named(name).serve_again()
        return self.model.ready

    def unload(self, name: str) -> None:
        self._named(name).stop()

    def _named(self, name: str) -> KServeModel:
        if name != self.model.name:
            raise KeyError(f"model with name {name} does not exist")
        return self.model


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
