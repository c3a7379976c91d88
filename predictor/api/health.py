"""Is the server alive, ready, stopping: the probe routes every client family expects, and graceful shutdown.

- GET / answers KServe's V1 liveness ({"status": "alive"}) and Kaito's "server is running" in one body.
- GET /health (vLLM; also /openai/health, where guidellm looks given the base URL http://host/openai/v1),
  GET /v1/models/{name} (KServe V1), GET /v2/models/{name}/ready and /v2/health/ready
  (KServe V2) are 200 only when the model is loaded and the engine runs, 503 otherwise, without a log line.
- GET /healthz (Kaito) also runs a tiny operation on the device, on a thread of its own: it never waits behind
  tokenization or grammar compilation. GET /version names the versions.
- POST /shutdown (Kaito; off unless --enable_shutdown) shuts down as SIGTERM does (predictor/api/shutdown.py).
- KServe's model repository (POST /v2/repository/models/{name}/load, /unload) would let anyone who reaches the
  port take the model out of service: it is 404 unless --enable_model_repository (and then behind --api_key).
- KServe's POST /v1/models/{name}:explain would answer 501 (no explainer is deployed with this server): 404.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from predictor.api.errors import error_response
from predictor.api.service import ServedModel
from predictor.api.shutdown import Shutdown

logger = logging.getLogger(__name__)

DEVICE_CHECK_TIMEOUT_S = 5.0


def health_router(served: ServedModel, shutdown: Shutdown, *, enable_shutdown: bool,
                  enable_model_repository: bool) -> APIRouter:
    router = APIRouter(tags=["health"])
    device_probe = ThreadPoolExecutor(1, thread_name_prefix="device-probe")

    def problem() -> str | None:
        return readiness_problem(served, shutdown.started)

    @router.get("/")
    async def live() -> dict:
        return {"status": "alive", "message": "Server is running"}

    @router.get("/health", responses={503: {"description": "loading, failed or shutting down"}})
    @router.get("/openai/health", responses={503: {"description": "loading, failed or shutting down"}})
    async def health():
        return JSONResponse({}, status_code=503 if problem() else 200)

    @router.get("/version")
    async def version() -> dict:
        return {"version": metadata.version("llm-predictor"), "kserve": metadata.version("kserve")}

    @router.get("/v1/models/{name}")
    async def v1_model_ready(name: str):
        return _model_readiness(served, name, problem(), f"/v1/models/{name}")

    @router.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str):
        return _model_readiness(served, name, problem(), f"/v2/models/{name}/ready")

    @router.get("/v2/health/ready")
    async def v2_server_ready():
        ready = problem() is None
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @router.get("/healthz", responses={503: {"description": "loading, engine failed, shutting down, bad device"}})
    async def healthz():
        reason = problem() or await _device_problem(served, device_probe)
        if reason:
            return JSONResponse({"status": "Unhealthy", "reason": reason}, status_code=503)
        return {"status": "Healthy"}

    @router.post("/shutdown", responses={403: {"description": "not enabled (--enable_shutdown)"}})
    async def shutdown_server():
        if not enable_shutdown:
            return error_response("/shutdown", 403, "POST /shutdown is disabled; start the server with "
                                  "--enable_shutdown to allow it", "enable_shutdown")
        shutdown.start()
        return {"status": "shutting down"}

    if not enable_model_repository:
        @router.post("/v2/repository/models/{name}/load", include_in_schema=False)
        @router.post("/v2/repository/models/{name}/unload", include_in_schema=False)
        async def repository_disabled(name: str):
            return error_response("/v2/repository", 404, "the model repository is not served; start the server "
                                  "with --enable_model_repository to load and unload models")

    @router.post("/v1/models/{name}:explain", include_in_schema=False)
    async def explain_not_served(name: str):
        return error_response(f"/v1/models/{name}:explain", 404, "explanations are not served: this server has no "
                              "explainer")

    return router


def readiness_problem(served: ServedModel, shutting_down: bool = False) -> str | None:
    """Why the server cannot take requests now; None when it can."""
    engine = served.engine
    if engine is None:
        return "model is loading"
    if not engine.alive:  # a dead tensor-parallel rank fails rank 0's next collective, which ends the engine
        return "engine failed (see the server log)"
    if shutting_down or engine.draining:
        return "shutting down"
    if served.unloaded:
        return "model is unloaded"
    return None


def _model_readiness(served: ServedModel, name: str, problem: str | None, path: str) -> JSONResponse:
    if name != served.name:
        return error_response(path, 404, f"Model with name {name} does not exist.")
    if problem:
        return error_response(path, 503, f"Model with name {name} is not ready: {problem}")
    return JSONResponse({"name": name, "ready": True})


async def _device_problem(served: ServedModel, thread: ThreadPoolExecutor) -> str | None:
    engine = served.engine
    try:
        probe = asyncio.get_running_loop().run_in_executor(thread, engine.check_device)
        await asyncio.wait_for(probe, DEVICE_CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"device did not answer within {DEVICE_CHECK_TIMEOUT_S:g}s"
    except Exception:  # noqa: BLE001 - any failure means the device is unusable
        logger.exception("the device check failed")
        return "device is unusable (see the server log)"
    return None
