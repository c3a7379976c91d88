"""KServe's ModelServer with what this server needs changed: the address it listens on (KServe's always binds
0.0.0.0, kserve/kserve#4558), the one-model repository (predictor/api/kserve_model.py), and a short wait for
uvicorn once the shutdown (predictor/api/shutdown.py) has ended every request."""

from __future__ import annotations

import kserve

from predictor.api.kserve_model import KServeModel, OneModelRepository

FINAL_WRITES_S = 5  # after the shutdown has ended every request: how long uvicorn waits for their last bytes


class ModelServer(kserve.ModelServer):
    def __init__(self, model: KServeModel, *, host: str, http_port: int, grpc_port: int, enable_grpc: bool):
        super().__init__(http_port=http_port, grpc_port=grpc_port, enable_grpc=enable_grpc, workers=1,
                         registered_models=OneModelRepository(model), grace_period=FINAL_WRITES_S)
        self.host = host

    def setup_event_loop(self) -> None:
        # start() calls this once it has built its REST server and before serving it: where it listens is set here.
        self._rest_server.config.host = self.host
        super().setup_event_loop()
