"""Embeddings: OpenAI's /openai/v1/embeddings (also under /v1) and llm-api's /embeddings.

A text's embedding is the served model's last hidden state, mean-pooled over its tokens and L2-normalised,
computed by the engine between batch steps. A request's inputs are one engine job: counted against max_queue
together, and dropped (those not yet computed) when the client leaves.
"""

from __future__ import annotations

import base64
import struct
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response
from openai.types import CreateEmbeddingResponse, Embedding
from openai.types.create_embedding_response import Usage
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from predictor.api.json_bodies import ParsedBodyRoute, json_response
from predictor.api.openai.protocol import integer_token_ids
from predictor.api.service import GenerationService, ServedModel, check_in_vocabulary
from predictor.engine import InvalidRequest

MAX_EMBEDDING_INPUTS = 256


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request: one text, texts, one token-id list, or token-id lists."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]

    @field_validator("input", mode="before")
    @classmethod
    def _integer_token_ids(cls, given):
        return integer_token_ids(given)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Only the model's hidden size is served.")
    user: str | None = None


class Base64Embedding(Embedding):
    embedding: str = Field(description="The float32 vector's little-endian bytes in base64 (encoding_format base64).")


class EmbeddingsResponse(CreateEmbeddingResponse):
    """OpenAI's answer, each embedding as floats or, with encoding_format base64, as a base64 string."""

    data: list[Embedding | Base64Embedding]


class TextEmbeddingRequest(BaseModel):
    """llm-api's embeddings request; the answer is the bare vector."""

    model_config = ConfigDict(extra="forbid")

    text: str


def embeddings_router(served: ServedModel) -> APIRouter:
    router = APIRouter(route_class=ParsedBodyRoute)
    ready = served.ready

    @router.post("/openai/v1/embeddings", responses={200: {"model": EmbeddingsResponse}})
    @router.post("/v1/embeddings", responses={200: {"model": EmbeddingsResponse}}, include_in_schema=False)
    async def create_embeddings(body: EmbeddingRequest) -> Response:
        service = ready()
        served.check(body.model)
        shape = service.shape
        if body.dimensions is not None and body.dimensions != shape.hidden_size:
            raise InvalidRequest("dimensions", f"must be this model's hidden size ({shape.hidden_size}) or left out")
        inputs = await _token_lists(service, body.input, shape.vocab_size)
        vectors = await _embed_all(service, inputs, "input")

        def payload() -> dict:
            response = CreateEmbeddingResponse(
                object="list",
                model=served.name,
                data=[Embedding(object="embedding", index=i, embedding=v) for i, v in enumerate(vectors)],
                usage=Usage(prompt_tokens=sum(map(len, inputs)), total_tokens=sum(map(len, inputs))),
            )
            built = response.model_dump()
            if body.encoding_format == "base64":
                for item in built["data"]:
                    item["embedding"] = _base64_floats(item["embedding"])
            return built

        return await json_response(payload)

    @router.post("/embeddings", response_model=list[float])
    async def text_embedding(body: TextEmbeddingRequest) -> list[float]:
        service = ready()
        (vector,) = await _embed_all(service, [await _encode_text(service, body.text, "text")], "text")
        return vector

    return router


async def _token_lists(service: GenerationService, given, vocab_size: int) -> list[list[int]]:
    """The request's input as one token-id list per embedding, each checked."""
    if isinstance(given, str):
        return [await _encode_text(service, given, "input")]
    if not given:
        raise InvalidRequest("input", "must not be empty")
    if len(given) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest("input", f"{len(given)} inputs exceed the limit of {MAX_EMBEDDING_INPUTS} per request")
    if isinstance(given[0], int):
        given = [given]
    service.engine.check_request_size(len(given), "input")  # before tokenizing any
    if isinstance(given[0], str):
        return [await _encode_text(service, text, f"input[{i}]") for i, text in enumerate(given)]
    for i, ids in enumerate(given):
        _check_token_ids(ids, vocab_size, f"input[{i}]", service.max_model_len)
    return given


async def _encode_text(service: GenerationService, text: str, field: str) -> list[int]:
    if not text:
        raise InvalidRequest(field, "must not be an empty string")
    ids = await service.encode_prompt(text, field)
    _check_length(ids, field, service.max_model_len)
    return ids


def _check_token_ids(ids: list[int], vocab_size: int, field: str, max_model_len: int) -> None:
    if not ids:
        raise InvalidRequest(field, "must not be an empty token list")
    check_in_vocabulary(ids, vocab_size, field)
    _check_length(ids, field, max_model_len)


def _check_length(ids: list[int], field: str, max_model_len: int) -> None:
    # The engine checks too; checking every input first names the one at fault and starts no work for the rest.
    if len(ids) > max_model_len:
        raise InvalidRequest(field, f"{len(ids)} tokens exceed max_model_len ({max_model_len})")


async def _embed_all(service: GenerationService, inputs: list[list[int]], field: str) -> list[list[float]]:
    """One engine job for the request's inputs; the client leaving cancels the await, which drops the inputs
    not yet computed."""
    return await service.engine.embed(inputs, field)


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's base64 form: the little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
