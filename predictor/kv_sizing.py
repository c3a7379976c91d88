"""How many KV cache blocks a rank gets: from --kv_cache_bytes if given, else, on CUDA, what
--gpu_memory_utilization of the device leaves after the weights, the worst step (vLLM's rule) and the decode CUDA
graphs, and never more than max_num_seqs sequences of max_model_len could use."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from predictor.config import CPU_KV_CACHE_BYTES, Settings
from predictor.engine.model_runner import ModelRunner
from predictor.loader import LoadError

logger = logging.getLogger(__name__)

SAMPLER_WORKSPACES = 8  # float32 [max_num_seqs, vocab] temporaries the sampler holds at once, at most


@dataclass(frozen=True)
class KVCachePlan:
    num_blocks: int  # including the scratch block
    block_size: int
    budget_bytes: int
    source: str  # where the budget came from, for the start-up log

    @property
    def tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size


def plan_kv_cache(runner: ModelRunner, settings: Settings, max_model_len: int, graph_bytes: int = 0) -> KVCachePlan:
    """graph_bytes: what the CUDA graphs took when measured (FastPath.prepare), taken from a gpu_memory_utilization
    budget (an explicit kv_cache_bytes is the cache's size, whatever the graphs take)."""
    block_size, block_bytes = settings.block_size, runner.kv_bytes_per_block
    if settings.kv_cache_bytes is not None:
        budget, source = int(settings.kv_cache_bytes), "kv_cache_bytes"
    elif runner.device.type == "cuda":
        budget, source = _cuda_budget(runner, settings, graph_bytes), "gpu_memory_utilization"
    else:
        budget, source = CPU_KV_CACHE_BYTES, "the CPU default"
    blocks_per_sequence = -(-max_model_len // block_size)
    usable = min(budget // block_bytes, settings.max_num_seqs * blocks_per_sequence)
    if usable < blocks_per_sequence:
        raise LoadError(
            f"{source.replace('the CPU default', 'kv_cache_bytes')}: the KV cache gets {budget} bytes, less than "
            f"one sequence of max_model_len {max_model_len} needs ({blocks_per_sequence * block_bytes} bytes); "
            "raise it or lower max_model_len"
        )
    return KVCachePlan(usable + 1, block_size, budget, source)


def _cuda_budget(runner: ModelRunner, settings: Settings, graph_bytes: int) -> int:
    device = runner.device
    peak = runner.peak_forward_bytes(settings.max_prefill_tokens, settings.max_num_seqs)
    peak += SAMPLER_WORKSPACES * settings.max_num_seqs * runner.vocab_size * 4
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = total - free - torch.cuda.memory_reserved(device)
    budget = int(total * settings.gpu_memory_utilization) - peak - outside_torch - graph_bytes
    logger.info("CUDA memory: %.1f GiB in all, %.1f GiB at the peak of the worst step (weights included), "
                "%.1f GiB outside torch, %.2f GiB for CUDA graphs", total / 2**30, peak / 2**30,
                outside_torch / 2**30, graph_bytes / 2**30)
    return max(0, budget)


def log_plan(plan: KVCachePlan, runner: ModelRunner, max_model_len: int) -> None:
    logger.info(
        "KV cache (%s): %d blocks of %d tokens = %d tokens, %.1f MiB per rank; %.1f sequences of max_model_len %d",
        plan.source, plan.num_blocks - 1, plan.block_size, plan.tokens,
        plan.num_blocks * runner.kv_bytes_per_block / 2**20, plan.tokens / max_model_len, max_model_len,
    )
