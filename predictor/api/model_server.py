"""KServe's ModelServer with what this server needs changed: the address it listens on (KServe's always binds
0.0.0.0, kserve/kserve#4558), uvicorn running the limited HTTP protocol (predictor/api/transport.py), the one-model
repository (predictor/api/kserve_model.py), and a short wait for uvicorn once the shutdown
(predictor/api/shutdown.py) has ended every request."""

from __future__ import annotations

import asyncio
import dataclasses

import kserve

from predictor.api.kserve_model import KServeModel, OneModelRepository
from predictor.api.transport import Limits, connection_cap, protocol_class, quiet_accept_errors

FINAL_WRITES_S = 5  # after the shutdown has ended every request: how long uvicorn waits for their last bytes


class ModelServer(kserve.ModelServer):
    def __init__(self, model: KServeModel, limits: Limits, *, host: str, http_port: int, grpc_port: int,
                 enable_grpc: bool):
        super().__init__(http_port=http_port, grpc_port=grpc_port, enable_grpc=enable_grpc, workers=1,
                         registered_models=OneModelRepository(model), grace_period=FINAL_WRITES_S,
                         timeout_keep_alive=limits.keep_alive_timeout)
        self.host = host
        self.limits = limits

    def setup_event_loop(self) -> None:
        # start() calls this once it has built its REST server and before serving it: where it listens is set here.
        self._rest_server.config.host = self.host
        super().setup_event_loop()

    async def _serve(self) -> None:
        # KServe builds the uvicorn Config when it starts (kserve 0.21's RESTServer); _serve is the first moment it
        # exists and nothing has read it yet.
        if self._rest_server is not None:
            config = self._rest_server.config
            if config.http != "auto":  # what the limited protocol replaces: httptools, uvicorn's choice when installed
                raise RuntimeError(f"expected uvicorn's 'auto' HTTP protocol, found {config.http!r}")
            cap = connection_cap(self.limits.max_connections)
            config.http = protocol_class(dataclasses.replace(self.limits, max_connections=cap))
        asyncio.get_running_loop().set_exception_handler(quiet_accept_errors)
        await super()._serve()
