"""GPU sizing rules shared by the model manifest and the catalog (predictor/tools/catalog.yaml).

The catalog's derived fields are computed with these functions (tests check they agree), so a chart that
reads either the catalog or a baked manifest sizes a model the same way.
"""

from __future__ import annotations

import math

# The GPU counts a node offers; a tensor-parallel size must also divide both head counts.
GPU_COUNTS = (1, 2, 4, 8)
KV_SEQUENCES = 4
OVERHEAD = 1.10
DEFAULT_GPU_BYTES = 24 * 2**30  # A10G / L4 class: the smallest GPUs a 7B model is served on


def estimate_gpu_memory_bytes(weight_bytes: int, kv_per_token: int, max_context: int) -> int:
    """Weights + a KV cache for KV_SEQUENCES full-context sequences + 10% (activations, CUDA context)."""
    return math.ceil(OVERHEAD * (weight_bytes + kv_per_token * max_context * KV_SEQUENCES))


def tensor_parallel_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    return [tp for tp in GPU_COUNTS if num_heads % tp == 0 and num_kv_heads % tp == 0]


def default_tensor_parallel_size(gpu_memory_bytes: int, valid_sizes: list[int],
                                 gpu_bytes: int = DEFAULT_GPU_BYTES) -> int:
    """The smallest valid size whose per-GPU share fits one GPU; the largest valid one otherwise."""
    for tp in valid_sizes:
        if math.ceil(gpu_memory_bytes / tp) <= gpu_bytes:
            return tp
    return valid_sizes[-1]
