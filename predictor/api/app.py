"""Wiring our routes, error handlers and middleware onto KServe's FastAPI app (KServe adds its own V1/V2 routes
after ours when the server starts, so ours answer first where both match)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from predictor.api.embeddings import embeddings_router
from predictor.api.errors import KSERVE_PATHS, ModelNotFound, error_response, response_for
from predictor.api.health import health_router
from predictor.api.kaito.routes import kaito_router
from predictor.api.kserve_model import KServeModel
from predictor.api.middleware import AccessLog, BufferedBody, InternalErrors, RequireKey
from predictor.api.openai.responses_api import responses_router
from predictor.api.openai.routes import completions_router
from predictor.api.service import ServedModel
from predictor.api.shutdown import Shutdown, take_signals_on_startup
from predictor.api.worker import worker_router
from predictor.engine import EngineError

logger = logging.getLogger(__name__)


def install(app: FastAPI, model: KServeModel, *, api_key: str | None, max_request_bytes: int,
            enable_shutdown: bool = False, enable_model_repository: bool = False, log_requests: bool = False,
            shutdown_timeout: float = 0.0) -> None:
    served = ServedModel(model.name, lambda: model.service, lambda: model.unloaded)
    shutdown = Shutdown(served, shutdown_timeout)
    take_signals_on_startup(app, shutdown)
    routers = [health_router(served, shutdown, enable_shutdown=enable_shutdown,
                             enable_model_repository=enable_model_repository),
               *(router(served) for router in (kaito_router, completions_router, responses_router, embeddings_router,
                                               worker_router))]
    for router in routers:
        app.include_router(router)
    openai = sorted({route.path for router in routers for route in router.routes if route.path.startswith("/openai/")})
    logger.info("serving OpenAI's API at %s (and under /v1 but for /v1/models, KServe's model list)",
                ", ".join(openai))
    app.add_exception_handler(EngineError, _refused)
    app.add_exception_handler(ModelNotFound, _refused)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Each add_middleware wraps what was added before: the key is checked before a body is read.
    app.add_middleware(BufferedBody, max_bytes=max_request_bytes)
    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)
    app.add_middleware(InternalErrors)
    app.add_middleware(AccessLog, log_probes=log_requests)


async def _refused(request: Request, err: EngineError | ModelNotFound) -> JSONResponse:
    return response_for(request.url.path, err)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """A 400 naming the field for a body that does not parse or breaks a bound: in OpenAI's shape on our routes,
    in KServe's {"error": message} on its V2 routes (whose body is InferenceRequest | bytes: the union's member
    names are left out of the field)."""
    first = err.errors()[0]
    if KSERVE_PATHS.match(request.url.path):
        loc = [p for p in first.get("loc", ()) if p not in ("body", "InferenceRequest", "bytes")]
        field = ".".join(str(p) for p in loc) or "body"
        return error_response(request.url.path, 400, f"{field}: {first.get('msg', 'invalid')}", field)
    if first.get("type") == "json_invalid":
        message = f"body: not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        return error_response(request.url.path, 400, message, "body")
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return error_response(request.url.path, 400, f"{field}: {first.get('msg', 'invalid')}", field)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (unreadable body, unknown route, wrong method) in OpenAI's shape on our routes, in
    KServe's {"error": message} on its V1/V2 routes (the V2 protocol's error shape)."""
    param = "body" if err.status_code == 400 else None
    response = error_response(request.url.path, err.status_code, str(err.detail), param)
    response.headers.update(getattr(err, "headers", None) or {})
    return response
