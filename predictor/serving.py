"""Start-up: load the model on every rank, then serve HTTP on rank 0 or follow rank 0 on the others."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import kserve
import torch
import torch.distributed as dist

from predictor import loader, metrics
from predictor.api import app
from predictor.api.chat_templates import resolve_chat_template
from predictor.api.kserve_model import KServeModel
from predictor.api.model_server import ModelServer
from predictor.api.service import GenerationService, ModelShape
from predictor.api.transport import Limits
from predictor.config import Settings
from predictor.engine import Engine
from predictor.engine.core import EngineCore
from predictor.engine.cuda_graphs import single_process
from predictor.engine.fast_path import FastPath
from predictor.engine.model_runner import ModelRunner
from predictor.engine.structured_output import Grammars
from predictor.engine.tp import (
    LeaderRunner,
    Liveness,
    Rank,
    RankLost,
    agreement,
    close_process_groups,
    follow,
    init_process_groups,
)
from predictor.kv_sizing import KVCachePlan, log_plan, plan_kv_cache
from predictor.tools.demo import ensure_demo_model
from predictor.tools.manifest import ManifestError, verify_manifest

logger = logging.getLogger(__name__)
FATAL_EXIT_DELAY_S = 0.5


@dataclass
class Loaded:
    model_dir: Path
    config: object
    runner: ModelRunner
    kv_cache: KVCachePlan
    max_model_len: int
    control: object | None  # the TP control group, None on a single process
    liveness: Liveness | None = None  # the TP heartbeat, None on a single process


def load(settings: Settings, rank: Rank | None) -> Loaded:
    model_dir = ensure_demo_model() if settings.serves_demo else settings.model_dir
    config = loader.load_config(model_dir, settings.trust_remote_code)
    if rank is None or rank.local_rank == 0:  # one check per node: each node has its own copy of the image
        try:
            verify_manifest(model_dir, settings.verify_weights)
        except ManifestError as err:
            raise loader.LoadError(f"verify_weights: {err}") from None
        loader.check_model_files(model_dir)
    tp_size = settings.tensor_parallel_size
    loader.check_tensor_parallel_size(config, tp_size)
    device = loader.resolve_device(settings.device, rank.local_rank if rank else 0)
    dtype = loader.resolve_dtype(settings.dtype, device, config)
    control, liveness_group = init_process_groups(device) if rank else (None, None)
    max_model_len = loader.resolve_max_model_len(model_dir, config, settings.max_model_len)
    model = loader.load_model(model_dir, config, dtype, device, tp_size, settings.trust_remote_code)
    runner = ModelRunner(model, block_size=settings.block_size, max_model_len=max_model_len)
    fast_path = FastPath(runner, enforce_eager=settings.enforce_eager, max_num_seqs=settings.max_num_seqs,
                         agree=agreement(control) if control is not None else single_process)
    graph_bytes = fast_path.prepare()
    plan = plan_kv_cache(runner, settings, max_model_len, graph_bytes)
    if control is not None:  # every rank must hold the same blocks: take the smallest plan
        blocks = torch.tensor([plan.num_blocks])
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=control)
        plan = dataclasses.replace(plan, num_blocks=int(blocks))
    liveness = None
    if liveness_group is not None:  # from here on the ranks keep in step: a silent one is lost, not slow
        liveness = Liveness(liveness_group, on_lost=_rank_lost)
        liveness.start()
    runner.allocate_kv_cache(plan.num_blocks)  # the whole cache now, so memory runs out at load, not under load
    fast_path.capture()
    logger.info("loaded %s: %s on %s, tp=%d, max_model_len %d", model_dir, dtype, device, tp_size, max_model_len)
    log_plan(plan, runner, max_model_len)
    return Loaded(model_dir, config, runner, plan, max_model_len, control, liveness)


def build_service(settings: Settings, loaded: Loaded) -> GenerationService:
    tokenizer = loader.load_tokenizer(loaded.model_dir, settings.trust_remote_code)
    runner = LeaderRunner(loaded.runner, loaded.control) if loaded.control else loaded.runner
    core = EngineCore(runner, num_blocks=loaded.kv_cache.num_blocks, block_size=loaded.kv_cache.block_size,
                      max_num_seqs=settings.max_num_seqs, max_prefill_tokens=settings.max_prefill_tokens,
                      max_model_len=loaded.max_model_len, enable_prefix_caching=settings.enable_prefix_caching,
                      async_scheduling=settings.async_scheduling)
    logger.info("prefix caching is %s", "on" if settings.enable_prefix_caching else "off")
    if settings.async_scheduling:
        logger.info("async scheduling is on: the next step is built while the device runs this one")
    eos_token_ids = loader.eos_token_ids(loaded.model_dir, tokenizer, loaded.config)
    engine = Engine(
        core,
        tokenizer,
        max_model_len=loaded.max_model_len,
        max_queue=settings.max_queue,
        eos_token_ids=eos_token_ids,
        grammars=_grammars(tokenizer, loaded.runner.vocab_size, eos_token_ids, settings.max_schema_bytes),
        on_fatal=_exit_soon,
    )
    engine.start()
    if loaded.liveness is not None:
        loaded.liveness.on_lost = engine.fail
    metrics.watch(engine)
    template = resolve_chat_template(settings.chat_template, tokenizer)
    text_config = loaded.config.get_text_config()
    shape = ModelShape(hidden_size=text_config.hidden_size, vocab_size=loaded.runner.vocab_size)
    return GenerationService(engine, tokenizer, template, settings.generation_defaults(), loaded.max_model_len,
                             shape)


def _grammars(tokenizer, vocab_size: int, eos_token_ids: set[int], max_schema_bytes: int) -> Grammars | None:
    """Structured output's grammar compiler over the tokenizer's vocabulary; None (structured output refused) if
    xgrammar cannot read this tokenizer."""
    try:
        return Grammars.for_tokenizer(tokenizer, vocab_size, eos_token_ids, max_schema_bytes)
    except Exception as err:  # noqa: BLE001 - the model is still served, without structured output
        logger.warning("structured output (response_format) is off: this tokenizer cannot be used by xgrammar: %s",
                       err)
        return None


def serve(settings: Settings, rank: Rank | None) -> int:
    """Rank 0 (or the only process): HTTP at once, readiness 503 until the model has loaded."""
    loaded_holder: list[Loaded] = []

    def build() -> GenerationService:
        loaded_holder.append(load(settings, rank))
        return build_service(settings, loaded_holder[0])

    model = KServeModel(settings.served_model_name, build)
    server = ModelServer(model, Limits.from_settings(settings), host=settings.host, http_port=settings.http_port,
                         grpc_port=settings.grpc_port, enable_grpc=settings.enable_grpc)
    app.install(kserve.model_server.app, model, api_key=settings.resolved_api_key,
                max_request_bytes=settings.max_request_bytes, enable_shutdown=settings.enable_shutdown,
                enable_model_repository=settings.enable_model_repository, log_requests=settings.log_requests,
                shutdown_timeout=settings.shutdown_timeout)
    threading.Thread(target=_load_or_exit, args=(model,), name="load", daemon=True).start()
    server.start([])
    if model.service is not None:
        model.service.engine.stop()
        if loaded_holder and loaded_holder[0].control is not None:
            LeaderRunner(loaded_holder[0].runner, loaded_holder[0].control).stop()
    if loaded_holder and loaded_holder[0].liveness is not None:
        loaded_holder[0].liveness.stop()
    close_process_groups()
    return 0


def run_follower(settings: Settings, rank: Rank) -> int:
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
    except loader.LoadError as err:
        print(f"llm-predictor: {err}", file=sys.stderr, flush=True)
        os._exit(2)
    except BaseException as err:  # noqa: BLE001 - a model that cannot load must stop the pod
        logger.exception("loading failed")
        print(f"llm-predictor: loading failed: {err}", file=sys.stderr, flush=True)
        os._exit(1)


def _rank_lost(err: RankLost) -> None:
    """Before rank 0's engine runs, and on the other ranks: nothing to drain, exit so that the pod restarts."""
    print(f"llm-predictor: {err}", file=sys.stderr, flush=True)
    os._exit(1)


def _exit_soon(err: BaseException) -> None:
    """The engine died (a rank failed, the device broke): readiness turns 503, then the process exits."""
    print(f"llm-predictor: engine failed, exiting: {err}", file=sys.stderr, flush=True)
    threading.Timer(FATAL_EXIT_DELAY_S, os._exit, args=(1,)).start()
