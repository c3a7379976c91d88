"""Linear layers on the CPU with their weights reordered once, at start, into oneDNN's blocked layout.

torch's F.linear hands MKL the weight as it lies, and MKL repacks it on every call: at a decode step's 64 rows that
packing is a large share of each matmul. oneDNN's linear over a weight reordered once (what vLLM's CPU build does,
and inductor's freezing pass) measured 1.2-1.7x faster per layer at 37-64 rows on the demo model's shapes, the same
at 2,048. Results differ from F.linear's in the last bits (another summation order).

Only float32 modules of exactly nn.Linear whose weight is a plain tensor are packed: not tensor-parallel shards
(DTensors), nor quantized or otherwise special layers. The original weight is released unless another module
shares it (tied embeddings), so that the weights are not held twice.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

logger = logging.getLogger(__name__)

_linear = torch.ops.mkldnn._linear_pointwise


def unavailable() -> str | None:
    """None when this torch can run packed linears, else why not: a weight is packed and checked once."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    try:
        generator = torch.Generator().manual_seed(0)
        weight, x = torch.randn(48, 32, generator=generator), torch.randn(5, 32, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        error = (_linear(x, packed, None, "none", [], "") - nn.functional.linear(x, weight)).abs().max().item()
    except RuntimeError as err:
        return f"oneDNN refused a packed linear: {str(err).splitlines()[0]}"
    return None if error < 1e-4 else f"oneDNN's packed linear is off by {error:g}"


def pack_linears(model: nn.Module) -> int:
    """Make every eligible nn.Linear of the model compute with a packed weight; returns how many it changed."""
    shared = _shared_weights(model)
    count = 0
    for module in model.modules():
        weight = module.weight if type(module) is nn.Linear else None
        if weight is None or weight.dtype != torch.float32 or type(weight.data) is not torch.Tensor:
            continue
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        module.forward = partial(_packed_forward, packed, module.bias)
        if weight.data_ptr() not in shared:
            module.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
        count += 1
    return count


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return _linear(x, packed, bias, "none", [], "")


def _shared_weights(model: nn.Module) -> set[int]:
    """Data pointers held by more than one parameter name (tied input and output embeddings)."""
    seen, shared = set(), set()
    for _, parameter in model.named_parameters(remove_duplicate=False):
        pointer = parameter.data_ptr()
        (shared if pointer in seen else seen).add(pointer)
    return shared
