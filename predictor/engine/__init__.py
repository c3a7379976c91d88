"""The batching engine: scheduler, paged KV cache, model runner, sampler and tensor parallelism.

It knows nothing of HTTP. The front-ends use Engine.submit() / embed() and iterate GenerationStream events.
"""

from predictor.engine.engine import Engine
from predictor.engine.errors import SHUTTING_DOWN, EngineError, EngineOverloaded, EngineUnavailable, InvalidRequest
from predictor.engine.sampling_params import SamplingParams, StructuredOutput, TokenLogprob
from predictor.engine.stream import Delta, Finished, FinishReason, GenerationStream

__all__ = [
    "SHUTTING_DOWN", "Delta", "Engine", "EngineError", "EngineOverloaded", "EngineUnavailable", "Finished",
    "FinishReason", "GenerationStream", "InvalidRequest", "SamplingParams", "StructuredOutput", "TokenLogprob",
]
