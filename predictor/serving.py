"""Start-up: rank 0 (or the only process) serves HTTP and starts the engine core's process, which loads the model
(predictor/core_process.py); the other ranks load theirs and follow rank 0's core."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kserve
import torch

from predictor import loader, metrics
from predictor.api import app
from predictor.api.chat_templates import resolve_chat_template
from predictor.api.kserve_model import KServeModel
from predictor.api.model_server import ModelServer
from predictor.api.service import GenerationService, ModelShape
from predictor.api.transport import Limits
from predictor.config import Settings
from predictor.engine import Engine
from predictor.engine.core_client import CoreLoadFailed, CoreStopped, ProcessCore
from predictor.engine.tp import Rank, close_process_groups, follow

logger = logging.getLogger(__name__)
FATAL_EXIT_DELAY_S = 0.5


def build_service(settings: Settings, core: ProcessCore) -> GenerationService:
    """Once the core has loaded the model: the tokenizer (loaded meanwhile), the engine's front over the core,
    the service. The core's errors come first: it checks the model directory's files before it loads them."""
    with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as meanwhile:
        early = None if settings.serves_demo else meanwhile.submit(loader.load_tokenizer, settings.model_dir,
                                                                    settings.trust_remote_code)
        ready = core.wait_ready()
        tokenizer = early.result() if early else loader.load_tokenizer(Path(ready.model_dir),
                                                                       settings.trust_remote_code)
    engine = Engine(
        core,
        tokenizer,
        max_model_len=ready.max_model_len,
        max_queue=settings.max_queue,
        eos_token_ids=set(ready.eos_token_ids),
        max_schema_bytes=settings.max_schema_bytes if ready.structured_output else None,
        on_fatal=_exit_soon,
    )
    engine.start()
    metrics.watch(engine)
    template = resolve_chat_template(settings.chat_template, tokenizer)
    shape = ModelShape(hidden_size=ready.hidden_size, vocab_size=ready.vocab_size)
    return GenerationService(engine, tokenizer, template, settings.generation_defaults(), ready.max_model_len, shape)


def serve(settings: Settings, core: ProcessCore) -> int:
    """Rank 0 (or the only process): HTTP at once, readiness 503 until the engine core's process (started by
    __main__, predictor/core_entry.py) has loaded the model. This process does no tensor work: the core gets
    the cores."""
    torch.set_num_threads(1)
    model = KServeModel(settings.served_model_name, lambda: build_service(settings, core))
    try:
        server = ModelServer(model, Limits.from_settings(settings), host=settings.host,
                             http_port=settings.http_port, grpc_port=settings.grpc_port,
                             enable_grpc=settings.enable_grpc)
        app.install(kserve.model_server.app, model, api_key=settings.resolved_api_key,
                    max_request_bytes=settings.max_request_bytes, enable_shutdown=settings.enable_shutdown,
                    enable_model_repository=settings.enable_model_repository, log_requests=settings.log_requests,
                    shutdown_timeout=settings.shutdown_timeout)
        threading.Thread(target=_load_or_exit, args=(model,), name="load", daemon=True).start()
        server.start([])
    finally:
        if model.service is not None:
            model.service.engine.stop()  # the core stops the other ranks and leaves the groups
        else:  # still loading (or the server never started)
            core.kill()
    return 0


def run_follower(settings: Settings, rank: Rank) -> int:
    from predictor.core_process import load  # here: rank 0's HTTP process never loads a model

    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 stops the others once it has drained (or the group breaks)
        signal.signal(sig, signal.SIG_IGN)
    try:
        loaded = load(settings, rank)
        follow(loaded.runner, loaded.control)
        loaded.liveness.stop()
        close_process_groups()
    except loader.LoadError as err:
        print(f"llm-predictor: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a failed collective means the group is broken: exit so the pod restarts
        logger.error("rank %d: %s", rank.rank, err)
        return 1
    return 0


def _load_or_exit(model: KServeModel) -> None:
    try:
        model.load()
        logger.info("model %s is ready", model.name)
    except CoreStopped:  # serve() stopped it: the server is exiting
        return
    except CoreLoadFailed as err:
        print(f"llm-predictor: {err}", file=sys.stderr, flush=True)
        os._exit(err.exit_code)
    except loader.LoadError as err:
        print(f"llm-predictor: {err}", file=sys.stderr, flush=True)
        os._exit(2)
    except BaseException as err:  # noqa: BLE001 - a model that cannot load must stop the pod
        logger.exception("loading failed")
        print(f"llm-predictor: loading failed: {err}", file=sys.stderr, flush=True)
        os._exit(1)


def _exit_soon(err: BaseException) -> None:
    """The engine died (its process, a rank, the device): readiness turns 503, then the process exits."""
    print(f"llm-predictor: engine failed, exiting: {err}", file=sys.stderr, flush=True)
    threading.Timer(FATAL_EXIT_DELAY_S, os._exit, args=(1,)).start()
