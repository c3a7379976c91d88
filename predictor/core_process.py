"""The engine core's process: load the model (on every tensor-parallel rank: load() here), then run the core loop.

serving.py starts run_core() with multiprocessing's `spawn` from the HTTP process, which keeps the tokenizer,
validation, streams and HTTP; this process owns the model, the KV cache, the scheduler, the sampler, the
grammar matchers and the embeddings' forwards. Under tensor parallelism it is rank 0 of the group (it inherits
RANK, WORLD_SIZE and MASTER_* from the HTTP process, which joins no group). It ignores SIGTERM and SIGINT (the
HTTP process drains, then sends Stop), and exits when the HTTP process is gone, even in the middle of loading.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from predictor import loader, logs
from predictor.config import Settings
from predictor.engine.core import EngineCore
from predictor.engine.core_client import PipeChannel
from predictor.engine.core_loop import CoreLoop
from predictor.engine.cuda_graphs import single_process
from predictor.engine.fast_path import FastPath
from predictor.engine.messages import CoreReady, LoadFailed
from predictor.engine.model_runner import ModelRunner
from predictor.engine.structured_output import Grammars
from predictor.engine.tp import (
    LeaderRunner,
    Liveness,
    Rank,
    RankLost,
    agreement,
    close_process_groups,
    init_process_groups,
)
from predictor.host_memory import keep_freed_memory
from predictor.kv_sizing import KVCachePlan, log_plan, plan_kv_cache
from predictor.tools.demo import ensure_demo_model
from predictor.tools.manifest import ManifestError, verify_manifest

logger = logging.getLogger(__name__)
PARENT_POLL_S = 0.5


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
        liveness = Liveness(liveness_group, on_lost=rank_lost)
        liveness.start()
    runner.allocate_kv_cache(plan.num_blocks)  # the whole cache now, so memory runs out at load, not under load
    fast_path.capture()
    if device.type == "cpu":  # the steps' activations live in host memory
        keep_freed_memory()
    logger.info("loaded %s: %s on %s, tp=%d, max_model_len %d", model_dir, dtype, device, tp_size, max_model_len)
    log_plan(plan, runner, max_model_len)
    return Loaded(model_dir, config, runner, plan, max_model_len, control, liveness)


def rank_lost(err: RankLost) -> None:
    """Before the core loop runs, and on the other ranks: nothing to drain, exit so that the pod restarts."""
    print(f"llm-predictor: {err}", file=sys.stderr, flush=True)
    os._exit(1)


def run_core(settings: Settings, rank: Rank | None, inbox, outbox, parent_pid: int) -> None:
    """The spawned process's target: load, say CoreReady (or LoadFailed), serve the core loop until Stop."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    logs.configure(settings.log_format)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    channel = PipeChannel(inbox, outbox)
    try:
        loaded = load(settings, rank)
        tokenizer = loader.load_tokenizer(loaded.model_dir, settings.trust_remote_code)
        eos_token_ids = loader.eos_token_ids(loaded.model_dir, tokenizer, loaded.config)
    except loader.LoadError as err:
        channel.send(LoadFailed(str(err), 2))
        os._exit(2)
    except BaseException as err:  # noqa: BLE001 - a model that cannot load must stop the pod
        logger.exception("loading failed")
        channel.send(LoadFailed(f"loading failed: {err}", 1))
        os._exit(1)
    runner = LeaderRunner(loaded.runner, loaded.control) if loaded.control else loaded.runner
    core = EngineCore(runner, num_blocks=loaded.kv_cache.num_blocks, block_size=loaded.kv_cache.block_size,
                      max_num_seqs=settings.max_num_seqs, max_prefill_tokens=settings.max_prefill_tokens,
                      max_model_len=loaded.max_model_len, enable_prefix_caching=settings.enable_prefix_caching,
                      async_scheduling=settings.async_scheduling)
    logger.info("prefix caching is %s", "on" if settings.enable_prefix_caching else "off")
    if settings.async_scheduling:
        logger.info("async scheduling is on: the next step is built while the device runs this one")
    grammars = _grammars(tokenizer, loaded.runner.vocab_size, eos_token_ids, settings.max_schema_bytes)
    loop = CoreLoop(core, channel, grammars)
    if loaded.liveness is not None:
        loaded.liveness.on_lost = lambda err: _lost_while_serving(loop, err)
    channel.send(CoreReady(str(loaded.model_dir), sorted(eos_token_ids), loaded.runner.vocab_size,
                           loaded.runner.hidden_size, loaded.max_model_len, grammars is not None))
    try:
        loop.run()
    except BaseException:  # noqa: BLE001 - logged and reported to the front (CoreFailed) by the loop
        os._exit(1)
    if loaded.control is not None:
        runner.stop()
    if loaded.liveness is not None:
        loaded.liveness.stop()
    close_process_groups()


def _grammars(tokenizer, vocab_size: int, eos_token_ids: set[int], max_schema_bytes: int) -> Grammars | None:
    """Structured output's grammar compiler over the tokenizer's vocabulary; None (structured output refused) if
    xgrammar cannot read this tokenizer."""
    try:
        return Grammars.for_tokenizer(tokenizer, vocab_size, eos_token_ids, max_schema_bytes)
    except Exception as err:  # noqa: BLE001 - the model is still served, without structured output
        logger.warning("structured output (response_format) is off: this tokenizer cannot be used by xgrammar: %s",
                       err)
        return None


def _lost_while_serving(loop: CoreLoop, err: RankLost) -> None:
    """A rank stopped answering while this one may wait inside a step's collective: tell the front (it ends
    every request and exits non-zero), then exit."""
    print(f"llm-predictor: {err}", file=sys.stderr, flush=True)
    loop.fail(err)
    os._exit(1)


def _exit_with_parent(parent_pid: int) -> None:
    """No orphan core: when the HTTP process is gone (killed, crashed), exit, whatever this one is doing."""
    while os.getppid() == parent_pid:
        threading.Event().wait(PARENT_POLL_S)
    os._exit(1)
