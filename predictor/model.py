"""The KServe model: load() builds the engine; predict() serves V1 (prompt or messages) and V2 (text_input)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable

import kserve
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from predictor.config import Settings
from predictor.engine import InvalidRequest, SamplingParams
from predictor.generation import Completion, TextGenerator

logger = logging.getLogger(__name__)


class LLMModel(kserve.Model):
    def __init__(self, name: str, build: Callable[[], TextGenerator]):
        super().__init__(name)
        self._build = build
        self.generator: TextGenerator | None = None

    def load(self) -> bool:
        self.generator = self._build()
        self.ready = True
        return self.ready

    async def healthy(self) -> bool:
        return self.ready and self.generator is not None and self.generator.engine.alive

    async def predict(self, payload, headers=None, response_headers=None):
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload)
        if isinstance(payload, (bytes, str)):  # a JSON body sent without a JSON content-type
            try:
                payload = json.loads(payload)
            except ValueError as err:
                raise InvalidInput(f"body: not valid JSON: {err}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
            raise InvalidInput('body: expected {"instances": [{"prompt": ...} | {"messages": [...]}, ...]}')
        return {"predictions": await self._complete_all(payload["instances"])}

    async def _complete_all(self, instances: list) -> list[dict]:
        jobs = [self._prepare(instance) for instance in instances]  # every instance is checked before any starts
        tasks = [asyncio.ensure_future(self.generator.complete(ids, params)) for ids, params in jobs]
        try:
            return [_prediction(c) for c in await asyncio.gather(*tasks)]
        except InvalidRequest as err:
            raise InvalidInput(str(err)) from None
        finally:  # one failure (or a cancelled request) cancels the others, which frees their KV slots
            for task in tasks:
                task.cancel()

    def _prepare(self, instance) -> tuple[list[int], SamplingParams]:
        generator = self.generator
        if not isinstance(instance, dict) or ("prompt" in instance) == ("messages" in instance):
            raise InvalidInput("instances: each instance needs exactly one of 'prompt' or 'messages'")
        unknown = set(instance) - {"prompt", "messages", "parameters"}
        if unknown:
            raise InvalidInput(f"instances: unknown field(s) {sorted(unknown)}")
        try:
            if "prompt" in instance:
                prompt_ids = generator.encode_prompt(instance["prompt"])
            else:
                prompt_ids = generator.encode_chat(instance["messages"])
            return prompt_ids, generator.sampling_params(instance.get("parameters"), len(prompt_ids))
        except InvalidRequest as err:
            raise InvalidInput(str(err)) from None

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        texts_input = next((i for i in request.inputs if i.name == "text_input"), None)
        if texts_input is None or texts_input.datatype != "BYTES":
            raise InvalidInput("inputs: expected a BYTES input named 'text_input'")
        prompts = [t.decode() if isinstance(t, bytes) else str(t) for t in texts_input.data]
        parameters = dict(request.parameters or {})
        results = await self._complete_all([{"prompt": p, "parameters": parameters} for p in prompts])
        output = InferOutput(
            name="text_output", shape=[len(results)], datatype="BYTES", data=[r["generated_text"] for r in results]
        )
        return InferResponse(
            model_name=self.name, infer_outputs=[output], response_id=request.id or str(uuid.uuid4())
        )


def _prediction(completion: Completion) -> dict:
    return {
        "generated_text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
    }


def build_defaults(settings: Settings) -> dict:
    return {
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "repetition_penalty": settings.repetition_penalty,
    }
