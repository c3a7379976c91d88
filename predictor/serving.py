"""Start-up: load the model on every rank, then serve HTTP on rank 0 or follow rank 0 on the others."""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import kserve
import torch

from predictor import http, loader, metrics
from predictor.chat_templates import resolve_chat_template
from predictor.config import Settings
from predictor.engine import Engine
from predictor.generation import TextGenerator
from predictor.kv_cache import kv_bytes_per_token
from predictor.model import LLMModel, build_defaults
from predictor.runner import ModelRunner
from predictor.tools.demo import ensure_demo_model
from predictor.tools.manifest import ManifestError, verify_manifest
from predictor.tp import LeaderRunner, Rank, follow, init_process_groups

logger = logging.getLogger(__name__)
FATAL_EXIT_DELAY_S = 0.5


@dataclass
class Loaded:
    model_dir: Path
    config: object
    runner: ModelRunner
    max_model_len: int
    control: object | None  # the TP control group, None on a single process


def load(settings: Settings, rank: Rank | None) -> Loaded:
    model_dir = ensure_demo_model() if settings.serves_demo else settings.model_dir
    config = loader.load_config(model_dir, settings.trust_remote_code)
    if rank is None or rank.local_rank == 0:  # one check per node: each node has its own copy of the image
        try:
            verify_manifest(model_dir, settings.verify_weights)
        except ManifestError as err:
            raise loader.LoadError(f"verify_weights: {err}") from None
    tp_size = settings.tensor_parallel_size
    loader.check_tensor_parallel_size(config, tp_size)
    device = loader.resolve_device(settings.device, rank.local_rank if rank else 0)
    dtype = loader.resolve_dtype(settings.dtype, device, config)
    control = init_process_groups(device) if rank else None
    max_model_len = settings.max_model_len or getattr(config, "max_position_embeddings", None) or 2048
    num_slots = _slots_that_fit(settings, config, tp_size, dtype, max_model_len)
    model = loader.load_model(model_dir, config, dtype, device, tp_size, settings.trust_remote_code)
    runner = ModelRunner(model, num_slots=num_slots, max_len=max_model_len)
    runner.prefill(0, [0])  # allocates the whole KV cache now, so memory runs out at load, not under load
    logger.info("loaded %s: %s on %s, tp=%d, %d slots of %d tokens", model_dir, dtype, device, tp_size, num_slots,
                max_model_len)
    return Loaded(model_dir, config, runner, max_model_len, control)


def _slots_that_fit(settings: Settings, config, tp_size: int, dtype: torch.dtype, max_model_len: int) -> int:
    per_sequence = kv_bytes_per_token(config, tp_size, dtype) * max_model_len
    slots = min(settings.max_num_seqs, int(settings.kv_cache_bytes) // per_sequence)
    if slots < 1:
        raise loader.LoadError(
            f"kv_cache_bytes: {int(settings.kv_cache_bytes)} bytes hold no sequence of max_model_len "
            f"{max_model_len} ({per_sequence} bytes each); raise kv_cache_bytes or lower max_model_len"
        )
    return slots


def build_generator(settings: Settings, loaded: Loaded) -> TextGenerator:
    tokenizer = loader.load_tokenizer(loaded.model_dir, settings.trust_remote_code)
    runner = LeaderRunner(loaded.runner, loaded.control) if loaded.control else loaded.runner
    engine = Engine(
        runner,
        tokenizer,
        num_slots=loaded.runner.cache.num_slots,
        max_model_len=loaded.max_model_len,
        max_queue=settings.max_queue,
        max_prefill_tokens=settings.max_prefill_tokens,
        eos_token_ids=loader.eos_token_ids(loaded.model_dir, tokenizer, loaded.config),
        on_fatal=_exit_soon,
    )
    engine.start()
    metrics.watch(engine)
    template = resolve_chat_template(settings.chat_template, tokenizer)
    return TextGenerator(engine, tokenizer, template, build_defaults(settings), loaded.max_model_len)


def serve(settings: Settings, rank: Rank | None) -> int:
    """Rank 0 (or the only process): HTTP at once, readiness 503 until the model has loaded."""
    loaded_holder: list[Loaded] = []

    def build() -> TextGenerator:
        loaded_holder.append(load(settings, rank))
        return build_generator(settings, loaded_holder[0])

    model = LLMModel(settings.served_model_name, build)
    server = kserve.ModelServer(
        http_port=settings.http_port, grpc_port=settings.grpc_port, enable_grpc=settings.enable_grpc, workers=1
    )
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    http.install(kserve.model_server.app, model, api_key, settings.max_request_bytes,
                 enable_shutdown=settings.enable_shutdown)
    server.register_model(model)
    threading.Thread(target=_load_or_exit, args=(model,), name="load", daemon=True).start()
    server.start([])
    if model.generator is not None:
        model.generator.engine.stop()
        if loaded_holder and loaded_holder[0].control is not None:
            LeaderRunner(loaded_holder[0].runner, loaded_holder[0].control).stop()
    return 0


def run_follower(settings: Settings, rank: Rank) -> int:
    try:
        loaded = load(settings, rank)
        follow(loaded.runner, loaded.control)
    except loader.LoadError as err:
        print(f"llm-predictor: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a failed collective means the group is broken: exit so the pod restarts
        logger.error("rank %d: %s", rank.rank, err)
        return 1
    return 0


def _load_or_exit(model: LLMModel) -> None:
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


def _exit_soon(err: BaseException) -> None:
    """The engine died (a rank failed, the device broke): readiness turns 503, then the process exits."""
    print(f"llm-predictor: engine failed, exiting: {err}", file=sys.stderr, flush=True)
    threading.Timer(FATAL_EXIT_DELAY_S, os._exit, args=(1,)).start()
