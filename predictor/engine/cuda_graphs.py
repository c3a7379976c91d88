"""CUDA graphs of decode-only steps: one per batch-size bucket, captured at start, replayed with a step's inputs
copied into their static buffers.

The buckets share those buffers (nano-vllm's way): token ids, positions, slots and lengths, the block tables, and
one output buffer of hidden states [largest bucket, hidden]; the graph of `size` rows works on their first `size`
rows. A graph ends at the base model's last hidden state: the logits are computed after replay, for the sampled
rows only, so that no bucket holds a [size, vocab] logits tensor of its own (all buckets together: 2 GB at 1024
sequences, 34 GB at 4096, in bf16 with a 32k vocab). Buckets stop at 512 rows; a larger decode batch runs
eagerly, where the launch overhead that graphs save is small beside the step's own work.

Rows past a step's batch are padding: they write to the scratch block and attend over nothing (length 0).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable

import torch

from predictor.engine.attention import AttentionMetadata
from predictor.engine.block_manager import SCRATCH_BLOCK
from predictor.engine.model_inputs import ModelInputs, copy_to_device, upload

MAX_GRAPH_BATCH = 512
FAIL_CAPTURE_ENV = "PREDICTOR_FAIL_GRAPH_CAPTURE"
# The per-bucket inputs, one [ROWS, size] view of a shared buffer: token ids, positions, slots, lengths.
ROWS = 4


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 (vLLM's buckets), up to max_num_seqs or 512, which is always one."""
    largest = min(max_num_seqs, MAX_GRAPH_BATCH)
    sizes = [s for s in (1, 2, 4, 8) if s < largest]
    sizes += list(range(16, largest, 16))
    return [*sizes, largest]


def capture_fault_injected() -> bool:
    """Test fault injection, as vLLM's VLLM_* test variables: PREDICTOR_FAIL_GRAPH_CAPTURE=1 makes start-up run the
    capture on any device, the CPU included, and fail where recording would begin, so that the fallback to eager
    runs for real where no GPU is at hand."""
    return os.environ.get(FAIL_CAPTURE_ENV) == "1"


class CaptureFailed(RuntimeError):
    """Capturing a bucket failed, on this rank or, under tensor parallelism, on another."""


def single_process(ok: bool) -> bool:
    """The agreement of one process with itself (tensor parallelism passes tp.agreement's instead)."""
    return ok


class DecodeGraphs:
    """The captured decode graphs of one runner, over the KV cache it had at capture time."""

    def __init__(self, runner, sizes: list[int]):
        self.runner = runner
        self.sizes = sorted(sizes)
        largest, device = self.sizes[-1], runner.device
        self.inputs = torch.zeros(ROWS * largest, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(largest, runner.max_blocks_per_seq, dtype=torch.int64, device=device)
        self.hidden = torch.zeros(largest, runner.hidden_size, dtype=runner.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.scratch_slot = SCRATCH_BLOCK * runner.block_size

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def _bucket(self, size: int) -> torch.Tensor:
        return self.inputs[: ROWS * size].view(ROWS, size)

    # ---- capture ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self, agree: Callable[[bool], bool] = single_process) -> None:
        """Every bucket, largest first so that the smaller ones reuse its memory pool. Under tensor parallelism the
        forward all-reduces across ranks: each bucket is warmed up and captured on every rank together, and the
        ranks agree after each one, so that a rank whose capture failed never leaves the others waiting in a
        collective; then they all raise CaptureFailed."""
        pool = None
        for size in reversed(self.sizes):
            error = None
            try:
                self._warm_up(size)
                pool = self._record(size, pool)
            except Exception as err:  # noqa: BLE001 - the caller falls back to eager; the ranks agree first
                error = err
            if not agree(error is None):
                what = f"{type(error).__name__}: {error}" if error else "it failed on another rank"
                raise CaptureFailed(f"capturing the decode graph of batch size {size} failed: {what}") from error

    def _warm_up(self, size: int) -> None:
        """The forward once for real before it is recorded (kernels compiled, cuBLAS and NCCL set up, the
        collectives run once), on a side stream as torch asks for work outside the capture."""
        ids, positions, slots, seq_lens = self._bucket(size)
        ids.zero_()
        positions.zero_()
        slots.fill_(self.scratch_slot)
        seq_lens.zero_()
        if self.runner.device.type != "cuda":
            self._forward(size)
            return
        current = torch.cuda.current_stream(self.runner.device)
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(size)
        current.wait_stream(side)
        torch.cuda.synchronize(self.runner.device)  # no collective in flight when the capture begins

    def _record(self, size: int, pool):
        if capture_fault_injected():
            raise RuntimeError(f"{FAIL_CAPTURE_ENV}=1 (test fault injection)")
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (the NCCL watchdog's event queries) do not void the capture.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self._forward(size)
        self.graphs[size] = graph
        return graph.pool()

    def _forward(self, size: int) -> None:
        """The base model over the bucket's static inputs, its hidden states into the shared output buffer."""
        runner = self.runner
        ids, positions, slots, seq_lens = self._bucket(size)
        meta = AttentionMetadata(
            cache=runner.cache, chunk_query_starts=[0], chunk_seq_lens=[], chunk_block_tables=[],
            decode_start=0, decode_seq_lens=seq_lens, decode_block_tables=self.block_tables[:size],
            decode_max_len=None, use_triton=runner.use_triton,
        )
        runner.cache.slot_mapping = slots
        out = runner.model.base_model(input_ids=ids[None], position_ids=positions[None],
                                      past_key_values=runner.cache, use_cache=True, attention_metadata=meta)
        self.hidden[:size] = out.last_hidden_state[0]

    # ---- replay -----------------------------------------------------------------------------------------------

    def fits(self, batch: int) -> bool:
        return batch <= self.largest

    def replay(self, inputs: ModelInputs) -> torch.Tensor:
        """Logits [len(sample_indices), V] of a decode-only step of at most `largest` rows."""
        batch = len(inputs.query_lens)
        size = self.sizes[bisect.bisect_left(self.sizes, batch)]
        pad = size - batch
        rows = [*inputs.token_ids, *[0] * pad, *inputs.positions, *[0] * pad,
                *inputs.slot_mapping, *[self.scratch_slot] * pad, *inputs.seq_lens, *[0] * pad]
        copy_to_device(self.inputs[: ROWS * size], torch.tensor(rows, dtype=torch.int64))
        if inputs.placeholders is not None:
            inputs.placeholders.fill(self._bucket(size)[0])
        width = inputs.table_width  # columns past a row's length, and rows past the batch, are never read
        tables = [[*table, *[0] * (width - len(table))] for table in inputs.block_tables]
        copy_to_device(self.block_tables[:batch, :width], torch.tensor(tables, dtype=torch.int64))
        self.graphs[size].replay()
        hidden = self.hidden[:batch]
        if inputs.sample_indices != list(range(batch)):
            hidden = hidden[upload(torch.tensor(inputs.sample_indices), self.runner.device)]
        return self.runner.compute_logits(hidden)
