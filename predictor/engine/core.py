"""The engine's step: schedule → execute → sample → update, in the engine core's process, which owns the model.

Nothing here knows about processes, asyncio or HTTP: step() returns what each sampled sequence got, and the core
loop (predictor/engine/core_loop.py) sends that to the HTTP process as one message per step.

Async scheduling (vLLM v1's --async-scheduling) keeps one step in flight, so that the host's work for step N+1
(scheduling, building its inputs) overlaps the device's for step N: step() launches N+1, then waits for N's tokens,
updates N's sequences (stop, length, finish) and returns N's outputs. Each sequence that N samples and that goes on
gets a pending token (Sequence.num_pending): it counts in the sequence's length, so N+1 computes it, its id filled
in on the device from N's sampled tokens (model_inputs.Placeholders). A sequence that N ends (a stop token, an
error) wasted a row of N+1, dropped when N+1 is resolved; one that N ends by length gets no pending token, so
nothing more is computed for it. Where the host must see a step's tokens before the next step can be built, that
step is resolved at once (synchronously), as every step is with async scheduling off: a step with a sequence held
to a grammar (its next mask follows from this token).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from predictor.engine.block_manager import BlockManager
from predictor.engine.model_inputs import ModelInputs, Placeholders
from predictor.engine.sampler import FAILED, Draw, Sampler, SamplerOutput
from predictor.engine.sampling_params import TokenLogprob
from predictor.engine.scheduler import Chunk, Scheduler
from predictor.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

NAN_LOGITS = "the model's logits for this sequence were not numbers (NaN)"
PLACEHOLDER_ID = 0  # the host's id of a pending token; the runner writes the real one on the device


@dataclass
class SequenceOutput:
    """What one sequence got from a step: a token (None when it failed), and whether it is done."""

    seq: Sequence
    token: int | None
    logprob: TokenLogprob | None
    finish_reason: str | None  # "stop", "length", "error" or None while it goes on
    error: str | None = None


@dataclass
class LaunchedStep:
    """A launched step's sampled sequences (row i is seqs[i]) and their tokens: still being drawn on the device, or
    already on the host (a synchronous step)."""

    seqs: list[Sequence]
    draw: Draw | None = None
    output: SamplerOutput | None = None
    pending: list[bool] = field(default_factory=list)  # rows whose token is pending in its sequence

    def __post_init__(self):
        self._rows = {seq: row for row, seq in enumerate(self.seqs)}

    def row(self, seq: Sequence) -> int:
        return self._rows[seq]


class EngineCore:
    def __init__(self, runner, *, num_blocks: int, block_size: int, max_num_seqs: int, max_prefill_tokens: int,
                 max_model_len: int, enable_prefix_caching: bool = True, async_scheduling: bool = False):
        self.runner = runner
        self.max_model_len = max_model_len
        self.async_scheduling = async_scheduling
        self.blocks = BlockManager(num_blocks, block_size, enable_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
                                   watermark_blocks=num_blocks // 100)
        self.sampler = Sampler(runner.vocab_size, max_num_seqs, runner.device)
        self._in_flight: LaunchedStep | None = None  # async scheduling: the step whose tokens are not seen yet

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    @property
    def num_preempted_waiting(self) -> int:
        return sum(1 for seq in self.scheduler.waiting if seq.first_scheduled_at is not None)

    @property
    def kv_cache_usage(self) -> float:
        return self.blocks.num_used / self.blocks.num_blocks

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Remove a sequence; if a step in flight samples it, its token is dropped when the step is resolved."""
        seq = self.scheduler.abort(seq_id)
        if seq is not None:
            self.sampler.release(seq)
        return seq

    def step(self) -> tuple[list[SequenceOutput], list[Sequence]]:
        """One forward for everything scheduled; returns the sampled sequences' outputs (with async scheduling:
        those of the step before, resolved while this one runs) and the sequences admitted for the first time."""
        step = self.scheduler.schedule()
        for seq in step.preempted:
            self.sampler.release(seq)
        launched, started = self._launch(step.chunks) if step.chunks else (None, [])
        previous, self._in_flight = self._in_flight, None
        outputs = self._resolve(previous) if previous is not None else []
        if launched is not None and launched.output is None:
            self._in_flight = launched
        elif launched is not None:
            outputs += self._resolve(launched)
        return outputs, started

    def _launch(self, chunks: list[Chunk]) -> tuple[LaunchedStep, list[Sequence]]:
        chunks = sorted(chunks, key=lambda c: c.num_tokens == 1)  # prefill chunks first, then decodes
        logits = self.runner.execute(self._inputs(chunks))
        started = [c.seq for c in chunks if c.seq.first_scheduled_at is None]
        for seq in started:
            seq.first_scheduled_at = time.monotonic()
        for chunk in chunks:
            chunk.seq.num_computed = chunk.end
            self.blocks.mark_computed(chunk.seq, chunk.start, chunk.end)
        sampling = [c.seq for c in chunks if c.samples]
        if not sampling:  # prompt chunks only
            return LaunchedStep([], output=SamplerOutput([], [])), started
        for seq in sampling:
            if seq.sampler_row is None:
                self.sampler.add(seq)
        if self._can_defer(sampling):
            try:
                return self._defer(sampling, self.sampler.draw(logits, sampling)), started
            except Exception:  # noqa: BLE001 - isolate the row at fault below
                logger.exception("batched sampling failed; sampling the %d rows one by one", len(sampling))
                return LaunchedStep(sampling, output=self._sample_rows(logits, sampling)), started
        return LaunchedStep(sampling, output=self._sample(logits, sampling)), started

    def _can_defer(self, seqs: list[Sequence]) -> bool:
        """Whether the step's tokens may stay on the device while the next step is built: not where the host needs
        them first (a grammar's next mask follows from the token)."""
        return self.async_scheduling and all(s.grammar is None for s in seqs)

    def _defer(self, seqs: list[Sequence], draw: Draw) -> LaunchedStep:
        """Give each sequence that goes on past this token a pending one, for the next step to compute."""
        pending = []
        for seq in seqs:
            goes_on = (seq.num_generated + seq.num_pending + 1 < seq.params.max_new_tokens
                       and seq.num_tokens + 1 < self.max_model_len)
            seq.num_pending += goes_on
            pending.append(goes_on)
        return LaunchedStep(seqs, draw=draw, pending=pending)

    def _inputs(self, chunks: list[Chunk]) -> ModelInputs:
        ids, positions, slots, query_lens, seq_lens, tables, samples = [], [], [], [], [], [], []
        fill_indices, fill_sources = [], []
        for chunk in chunks:
            seq = chunk.seq
            known = min(chunk.end, seq.num_known_tokens)
            ids += seq.token_ids(chunk.start, known)
            if known < chunk.end:  # its last token is pending: the step in flight samples it
                assert known == chunk.end - 1 and self._in_flight is not None, "one pending token, from one step"
                fill_indices.append(len(ids))
                fill_sources.append(self._in_flight.row(seq))
                ids.append(PLACEHOLDER_ID)
            positions += range(chunk.start, chunk.end)
            slots += self.blocks.slots(seq, chunk.start, chunk.end)
            query_lens.append(chunk.num_tokens)
            seq_lens.append(chunk.end)
            tables.append(seq.block_table)
            if chunk.samples:
                samples.append(len(ids) - 1)
        placeholders = Placeholders(fill_indices, fill_sources, self._in_flight.draw.tokens) if fill_indices else None
        return ModelInputs(ids, positions, slots, query_lens, seq_lens, tables, samples, placeholders)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """The batch in one pass; if that raises, each row alone, so that only the rows at fault fail."""
        try:
            return self.sampler.sample(logits, seqs)
        except Exception:  # noqa: BLE001 - isolate the row at fault below
            logger.exception("batched sampling failed; sampling the %d rows one by one", len(seqs))
        return self._sample_rows(logits, seqs)

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        tokens, logprobs = [], []
        for row, seq in enumerate(seqs):
            try:
                out = self.sampler.sample(logits[row : row + 1], [seq])
                tokens += out.tokens
                logprobs += out.logprobs
            except Exception as err:  # noqa: BLE001 - this row fails, the others go on
                logger.exception("sampling failed for request %d", seq.id)
                seq.error = f"sampling failed: {err}"
                tokens.append(FAILED)
                logprobs.append(None)
        return SamplerOutput(tokens, logprobs)

    def _resolve(self, launched: LaunchedStep) -> list[SequenceOutput]:
        """The step's tokens on the host (waiting for the device if they are still being drawn), each sequence
        updated: its token appended, finished on a stop token, at its length or on an error."""
        sampled = launched.output if launched.output is not None else self.sampler.resolve(launched.draw)
        pending = launched.pending or [False] * len(launched.seqs)
        outputs = []
        for seq, token, logprob, was_pending in zip(launched.seqs, sampled.tokens, sampled.logprobs, pending,
                                                     strict=True):
            seq.num_pending -= was_pending
            if seq.status is SequenceStatus.FINISHED:
                continue  # aborted while the step ran, or ended by its previous token: this one was wasted
            if token == FAILED:
                seq.error = seq.error or NAN_LOGITS
                logger.warning("request %d failed: %s", seq.id, seq.error)
                outputs.append(SequenceOutput(seq, None, None, "error", seq.error))
                self._finish(seq)
                continue
            position = seq.num_known_tokens
            seq.output_token_ids.append(token)
            reason = None
            if token in seq.stop_ids or (seq.matcher is not None and seq.matcher.terminated):
                reason = "stop"
            elif seq.num_generated >= seq.params.max_new_tokens or seq.num_known_tokens >= self.max_model_len:
                reason = "length"
            outputs.append(SequenceOutput(seq, token, logprob, reason))
            if reason:
                self._finish(seq)
            elif position < seq.num_computed:  # the next step computed it as a placeholder: now it can be hashed
                self.blocks.mark_computed(seq, position, position + 1)
        return outputs

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.sampler.release(seq)
