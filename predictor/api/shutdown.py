"""Graceful shutdown, on SIGTERM or SIGINT (Kubernetes stopping the pod, Ctrl-C) and on POST /shutdown.

From the moment it starts, new requests get 503 "server is shutting down" and readiness turns 503, while
queued and running generations go on for up to --shutdown_timeout seconds. Any still running then ends: a
stream with a last error chunk in its route's shape (then its end marker), a whole response with a 503. Then
the HTTP server stops, serve() stops the engine and the other tensor-parallel ranks, and the process exits 0.

uvicorn's own handling of SIGTERM (which KServe keeps) would stop listening at once, wait its grace period, then
cancel every handler still running: streams cut without an end, a CancelledError traceback each. So once uvicorn
has installed its handlers, the signals are taken over here, and uvicorn's handler is called when nothing is
left to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

from fastapi import FastAPI

from predictor.api.service import ServedModel
from predictor.engine import Engine

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Shutdown:
    def __init__(self, served: ServedModel, timeout_s: float):
        self.served = served
        self.timeout_s = timeout_s
        self.task: asyncio.Task | None = None
        self._hurry = asyncio.Event()  # a second signal: end what still runs now
        self._stop_server: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM)

    @property
    def started(self) -> bool:
        return self.task is not None

    def take_signals(self) -> None:
        """From now on SIGTERM and SIGINT start the shutdown (a second one ends what still runs at once). Call on
        the event loop's thread (the main one) after uvicorn has installed its own handlers."""
        uvicorn_exit = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(uvicorn_exit):
            return  # uvicorn handles no signals here: neither do we
        self._stop_server = lambda: uvicorn_exit(signal.SIGTERM, None)
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            signal.signal(sig, lambda signum, frame: loop.call_soon_threadsafe(self._on_signal, signum))

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run())

    def _on_signal(self, signum: int) -> None:
        if self.started:
            logger.info("%s again: ending the requests still running now", signal.Signals(signum).name)
            self._hurry.set()
        else:
            logger.info("%s received", signal.Signals(signum).name)
            self.start()

    async def _run(self) -> None:
        engine = self.served.engine
        if engine is not None and engine.alive:
            await self._drain(engine)
        logger.info("stopping the server")
        self._stop_server()

    async def _drain(self, engine: Engine) -> None:
        engine.begin_drain()
        stats = engine.stats
        logger.info("shutting down: new requests get 503; %d running and %d waiting requests have up to %gs to "
                    "finish (shutdown_timeout)", stats["running"], stats["waiting"], self.timeout_s)
        drained = asyncio.ensure_future(engine.drained())
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({drained, hurry}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if not drained.done():
            stats = engine.stats
            logger.warning("shutting down: ending %d running and %d waiting requests", stats["running"],
                           stats["waiting"])
            engine.end_all()
        await drained


def take_signals_on_startup(app: FastAPI, shutdown: Shutdown) -> None:
    """Have the app's lifespan hand the signals to shutdown: the lifespan starts after uvicorn installed its own."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI):
        shutdown.take_signals()
        async with inner(app_) as state:
            yield state

    app.router.lifespan_context = lifespan
