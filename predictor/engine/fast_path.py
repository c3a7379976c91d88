"""The CUDA fast path, prepared once at start: the Triton decode kernel, then the decode CUDA graphs.

Each stage's failure is caught and the runner keeps what still works: a Triton that cannot compile or launch the
kernel leaves decodes on the gather path with no graphs; a failed capture leaves eager steps with the kernel. The
start-up log says it in one line, `CUDA graphs off: <reason>`, and the server becomes ready serving eagerly. Only
a failure that leaves the device itself broken (checked with a tiny operation) still fails the start, since a
server on a broken device would answer ready and fail every request.

Under tensor parallelism every rank runs this in step and the ranks agree over the control group after each stage,
so that they all take the same path (a failure on any rank turns the fast path off on all of them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from predictor.engine.cuda_graphs import (
    DecodeGraphs,
    capture_fault_injected,
    graph_batch_sizes,
    single_process,
)

logger = logging.getLogger(__name__)

REASON_CHARS = 160  # an exception's text in the one log line, shortened


def _short(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


class FastPath:
    def __init__(self, runner, *, enforce_eager: bool, max_num_seqs: int,
                 agree: Callable[[bool], bool] = single_process):
        self.runner = runner
        self.enforce_eager = enforce_eager
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_num_seqs = max_num_seqs
        self.agree = agree
        self.kernel_error: str | None = None  # why the Triton kernel is off, when it failed
        self.off_reason: str | None = None  # why there are no graphs; None while they are on
        self.graph_bytes = 0

    # ---- the two calls of start-up -------------------------------------------------------------------------

    def prepare(self) -> int:
        """Before the KV cache is sized: warm up the kernel, then measure the graphs' memory; returns the bytes
        to take from the KV cache's budget (0 without graphs).

        Graphs bake in the addresses of the KV tensors, and the KV cache's size depends on the graphs' memory:
        every graph is captured once over a provisional two-block cache to measure it, freed, and captured again
        (capture()) once the cache is allocated. Capturing twice costs seconds; an estimate could fall short and
        run out of memory under load. A capture that fails fails here, before the KV cache is sized, which then
        gets the memory graphs would have had."""
        self._warm_up_kernel()
        self.off_reason = self._obstacle()
        if not self.agree(self.off_reason is None):
            self.off_reason = self.off_reason or "another tensor-parallel rank cannot capture them"
        if self.off_reason is not None:
            logger.log(logging.WARNING if self.kernel_error else logging.INFO, "CUDA graphs off: %s", self.off_reason)
            return 0
        self.runner.allocate_kv_cache(2)
        measured = self._capture()
        self.runner.free_kv_cache()
        return measured or 0

    def capture(self) -> None:
        """After the KV cache is allocated: the graphs the server replays."""
        if self.off_reason is not None:
            return
        measured = self._capture()
        if measured is None:
            return
        self.graph_bytes = measured
        beyond = f"; decode batches above {self.sizes[-1]} run eagerly" if self.max_num_seqs > self.sizes[-1] else ""
        logger.info("CUDA graphs: %d decode batch sizes captured (%s), %.1f MiB, taken from the KV cache budget; "
                    "steps with a prompt chunk run eagerly%s", len(self.sizes), _sizes_text(self.sizes),
                    measured / 2**20, beyond)

    # ---- stages ---------------------------------------------------------------------------------------------

    def _warm_up_kernel(self) -> None:
        """Compile the Triton decode kernel for this model's shapes and build its launcher, so that a Triton that
        cannot (no C compiler for the launcher, an unsupported GPU) fails here rather than in the first request's
        step. The decodes then take the gather path, without graphs."""
        runner = self.runner
        if not runner.use_triton:
            return
        error = None
        try:
            warm_up_decode_kernel(runner)
        except Exception as err:  # noqa: BLE001 - any failure of the kernel means the gather path
            error = err
        if self.agree(error is None):
            return
        runner.use_triton = False
        runner.check_device()  # the device itself broken: the start fails, as it would have without Triton
        self.kernel_error = _short(error) if error else "it failed on another tensor-parallel rank"

    def _obstacle(self) -> str | None:
        """Why this runner cannot have graphs, or None."""
        runner = self.runner
        if self.enforce_eager:
            return "--enforce_eager" + (f"; {self._kernel_off()}" if self.kernel_error else "")
        if capture_fault_injected():
            return None  # the capture runs on any device, to fail where it records
        if runner.device.type != "cuda":
            return f"the model runs on the {runner.device.type}, not a CUDA device"
        if not runner.paged:
            return f"{type(runner.model).__name__} attends with its own code, not the paged attention"
        if self.kernel_error:
            return self._kernel_off()
        if not runner.use_triton:
            return "Triton is not installed; decodes take the gather path"
        if not _logits_computed_outside_match(runner):
            return (f"{type(runner.model).__name__}'s logits are not its output embedding of the hidden states, "
                    "which graphs compute after replay")
        return None

    def _kernel_off(self) -> str:
        return f"the Triton decode kernel is unusable ({self.kernel_error}); decodes take the gather path"

    def _capture(self) -> int | None:
        """Every bucket's graph over the runner's cache; the device memory they took, or None (and the runner
        eager) when the capture failed."""
        runner = self.runner
        before = _free_device_memory(runner.device)
        graphs = DecodeGraphs(runner, self.sizes)
        try:
            graphs.capture(self.agree)
        except Exception as err:  # noqa: BLE001 - eager still serves; a broken device is caught below
            del graphs
            self._fall_back(_short(err))
            return None
        runner.graphs = graphs
        return before - _free_device_memory(runner.device)

    def _fall_back(self, reason: str) -> None:
        runner = self.runner
        runner.graphs = None
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
        runner.check_device()  # a capture that left CUDA broken (a sticky error) fails the start, as it should
        self.off_reason = reason
        logger.warning("CUDA graphs off: %s", reason)


@torch.inference_mode()
def warm_up_decode_kernel(runner) -> None:
    """Compile every variant of the Triton decode kernels (split and merged, and whole) for this model's head
    counts, head size, block size and dtype, which are what Triton compiles them for, then launch one over a block
    of zeros: its output must be finite. Whatever this raises is caught by FastPath._warm_up_kernel."""
    from predictor.engine import triton_attention

    config = runner.model.config.get_text_config()
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    device, dtype = runner.device, runner.dtype
    cache = torch.zeros(2, runner.block_size, runner.kv_heads, runner.head_dim, dtype=dtype, device=device)
    triton_attention.warm_up(cache, cache, runner.kv_heads * group)
    q = torch.zeros(1, runner.kv_heads * group, runner.head_dim, dtype=dtype, device=device)
    tables = torch.ones(1, runner.max_blocks_per_seq, dtype=torch.int64, device=device)  # the graphs' table width
    lengths = torch.full((1,), runner.block_size, dtype=torch.int64, device=device)
    out = triton_attention.paged_decode_attention(q, cache, cache, tables, lengths, runner.head_dim ** -0.5)
    if out.shape != q.shape or not bool(torch.isfinite(out).all()):
        raise RuntimeError("the decode kernel's output is malformed")


@torch.inference_mode()
def _logits_computed_outside_match(runner) -> bool:
    """Whether compute_logits of the base model's hidden states gives the model's own logits (a model that
    scales or caps them in a way compute_logits does not know would decode wrong tokens from a graph)."""
    ids = torch.arange(1, 5, device=runner.device)[None]
    model = runner.model
    expected = model(input_ids=ids, use_cache=False).logits[0].float()
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
    outside = runner.compute_logits(hidden).float()
    return outside.shape == expected.shape and bool(
        torch.allclose(outside, expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max())))


def _free_device_memory(device: torch.device) -> int:
    """Free CUDA memory once everything queued has run and torch's cache of unused blocks is returned (0 on
    other devices, which only run the capture to fail it)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def _sizes_text(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 6 else f"{', '.join(map(str, sizes[:5]))}, ..., {sizes[-1]}"
