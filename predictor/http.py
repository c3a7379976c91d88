"""Wiring our routes, error mapping and the optional API key onto KServe's FastAPI app."""

from __future__ import annotations

import hmac
import re

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware

from predictor.engine import EngineError, EngineOverloaded
from predictor.model import LLMModel
from predictor.openai_api import completions_router

RETRY_AFTER_S = "1"
# Health, readiness and metrics stay open so probes and scrapers need no key.
OPEN_PATHS = re.compile(
    r"^/($|healthz$|metrics$|v2/health/|v2/?$|v1/models/[^/:]+$|v2/models/[^/]+/ready$|docs|openapi)"
)


def install(app: FastAPI, model: LLMModel, api_key: str | None) -> None:
    app.include_router(completions_router(model.name, lambda: model.generator if model.ready else None))
    app.add_exception_handler(EngineError, _engine_error)
    if api_key:
        app.add_middleware(BaseHTTPMiddleware, dispatch=_require_key(api_key))


async def _engine_error(_: Request, err: EngineError) -> JSONResponse:
    kind = {400: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable"}.get(err.status)
    body = {"error": {"message": str(err), "type": kind, "param": getattr(err, "field", None), "code": err.status}}
    headers = {"Retry-After": RETRY_AFTER_S} if isinstance(err, EngineOverloaded) else None
    return JSONResponse(body, status_code=err.status, headers=headers)


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
