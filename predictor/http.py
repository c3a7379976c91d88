"""Wiring our routes, error mapping and the optional API key onto KServe's FastAPI app."""

from __future__ import annotations

import hmac
import re

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware

from predictor.embeddings_api import embeddings_router
from predictor.engine import EngineError, EngineOverloaded, EngineUnavailable, InvalidRequest
from predictor.kaito_api import kaito_router
from predictor.middleware import BodySizeLimit, RequestCounter
from predictor.model import LLMModel
from predictor.openai_api import completions_router
from predictor.worker_api import worker_router

RETRY_AFTER_S = "1"
# Health, readiness and metrics stay open so probes and scrapers need no key.
OPEN_PATHS = re.compile(
    r"^/($|healthz$|metrics$|v2/health/|v2/?$|v1/models/[^/:]+$|v2/models/[^/]+/ready$|docs|openapi)"
)


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_exceeded", 503: "service_unavailable"}
KSERVE_PATHS = re.compile(r"^/v[12]/models")  # KServe's own routes keep its 422 validation errors


def install(app: FastAPI, model: LLMModel, api_key: str | None, max_request_bytes: int,
            enable_shutdown: bool = False) -> None:
    app.include_router(kaito_router(model, enable_shutdown))  # first: its GET / replaces KServe's
    app.include_router(completions_router(model.name, lambda: model.generator if model.ready else None))
    app.include_router(embeddings_router(model.name, lambda: model.generator if model.ready else None))
    app.include_router(worker_router(model.name, lambda: model.generator if model.ready else None))
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    if api_key:
        app.add_middleware(BaseHTTPMiddleware, dispatch=_require_key(api_key))
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_middleware(RequestCounter)


def engine_error_status(err: EngineError) -> int:
    for kind, status in ((InvalidRequest, 400), (EngineOverloaded, 429), (EngineUnavailable, 503)):
        if isinstance(err, kind):
            return status
    return 500


async def _engine_error(_: Request, err: EngineError) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if isinstance(err, EngineOverloaded) else None
    return _openai_error(engine_error_status(err), str(err), getattr(err, "field", None), headers)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """OpenAI's shape and status (400) for a body that does not parse or breaks a bound: name the field."""
    if KSERVE_PATHS.match(request.url.path):
        return await request_validation_exception_handler(request, err)
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return _openai_error(400, f"body: not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", "body")
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return _openai_error(400, f"{field}: {first.get('msg', 'invalid')}", field)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (unreadable body, unknown route, wrong method) in OpenAI's shape on our routes."""
    if KSERVE_PATHS.match(request.url.path):
        return await http_exception_handler(request, err)
    param = "body" if err.status_code == 400 else None
    return _openai_error(err.status_code, str(err.detail), param, getattr(err, "headers", None))


def _openai_error(status: int, message: str, param: str | None, headers: dict | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _require_key(api_key: str):
    expected = f"Bearer {api_key}".encode()

    async def dispatch(request: Request, call_next):
        if OPEN_PATHS.match(request.url.path):
            return await call_next(request)
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return JSONResponse({"error": {"message": "missing or wrong API key", "code": 401}}, status_code=401)
        return await call_next(request)

    return dispatch
