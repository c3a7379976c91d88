"""Error responses: one status per kind of error, one body shape per family of routes.

Our routes answer in OpenAI's shape, {"error": {"message", "type", "param", "code"}}; KServe's V1/V2 routes keep
KServe's {"error": message}. A 5xx body never carries exception internals.
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

from predictor.engine import EngineError, EngineOverloaded, EngineUnavailable, InvalidRequest

RETRY_AFTER_S = "1"
KSERVE_PATHS = re.compile(r"^/v[12]/(models|repository|health)")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_exceeded",
               500: "server_error", 503: "service_unavailable"}
INTERNAL_ERROR = "internal server error; the server log has the details"


class ModelNotFound(Exception):
    """A request names a model this server does not serve (OpenAI answers 404 model_not_found)."""

    def __init__(self, requested: str, served: str):
        super().__init__(f"The model {requested!r} does not exist; this server serves {served!r}")


def status_of(err: Exception) -> int:
    kinds = ((InvalidRequest, 400), (ModelNotFound, 404), (EngineOverloaded, 429), (EngineUnavailable, 503))
    return next((status for kind, status in kinds if isinstance(err, kind)), 500)


def error_body(status: int, message: str, param: str | None = None, code: int | str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status if code is None else code}}


def error_response(path: str, status: int, message: str, param: str | None = None, code: int | str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": message} if KSERVE_PATHS.match(path) else error_body(status, message, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def response_for(path: str, err: EngineError | ModelNotFound) -> JSONResponse:
    status = status_of(err)
    headers = {"Retry-After": RETRY_AFTER_S} if status == 429 else None
    if isinstance(err, ModelNotFound):
        return error_response(path, 404, str(err), "model", "model_not_found")
    message = INTERNAL_ERROR if status == 500 else str(err)  # 503s are the engine's own words, never a traceback's
    return error_response(path, status, message, getattr(err, "field", None), headers=headers)
