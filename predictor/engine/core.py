"""The engine's step: schedule → execute → sample → update, on one thread that owns the model.

Nothing here knows about asyncio or HTTP: step() returns what each sampled sequence got, and the Engine
(predictor/engine/engine.py) turns that into stream events.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from predictor.engine.block_manager import BlockManager
from predictor.engine.model_inputs import ModelInputs
from predictor.engine.sampler import FAILED, Sampler, SamplerOutput
from predictor.engine.sampling_params import TokenLogprob
from predictor.engine.scheduler import Chunk, Scheduler
from predictor.engine.sequence import Sequence

logger = logging.getLogger(__name__)

NAN_LOGITS = "the model's logits for this sequence were not numbers (NaN)"


@dataclass
class SequenceOutput:
    """What one sequence got from a step: a token (None when it failed), and whether it is done."""

    seq: Sequence
    token: int | None
    logprob: TokenLogprob | None
    finish_reason: str | None  # "stop", "length", "error" or None while it goes on
    error: str | None = None


class EngineCore:
    def __init__(self, runner, *, num_blocks: int, block_size: int, max_num_seqs: int, max_prefill_tokens: int,
                 max_model_len: int, enable_prefix_caching: bool = True):
        self.runner = runner
        self.max_model_len = max_model_len
        self.blocks = BlockManager(num_blocks, block_size, enable_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens,
                                   watermark_blocks=num_blocks // 100)
        self.sampler = Sampler(runner.vocab_size, max_num_seqs, runner.device)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_preempted_waiting(self) -> int:
        return sum(1 for seq in self.scheduler.waiting if seq.first_scheduled_at is not None)

    @property
    def kv_cache_usage(self) -> float:
        return self.blocks.num_used / self.blocks.num_blocks

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        seq = self.scheduler.abort(seq_id)
        if seq is not None:
            self.sampler.release(seq)
        return seq

    def step(self) -> tuple[list[SequenceOutput], list[Sequence]]:
        """One forward for everything scheduled; returns the sampled sequences' outputs and the sequences that
        were admitted for the first time."""
        step = self.scheduler.schedule()
        for seq in step.preempted:
            self.sampler.release(seq)
        if not step.chunks:
            return [], []
        chunks = sorted(step.chunks, key=lambda c: c.num_tokens == 1)  # prefill chunks first, then decodes
        logits = self.runner.execute(self._inputs(chunks))
        started = [c.seq for c in chunks if c.seq.first_scheduled_at is None]
        for seq in started:
            seq.first_scheduled_at = time.monotonic()
        for chunk in chunks:
            chunk.seq.num_computed = chunk.end
            self.blocks.mark_computed(chunk.seq, chunk.start, chunk.end)
        sampling = [c.seq for c in chunks if c.samples]
        for seq in sampling:
            if seq.sampler_row is None:
                self.sampler.add(seq)
        return self._update(sampling, self._sample(logits, sampling)), started

    def _inputs(self, chunks: list[Chunk]) -> ModelInputs:
        ids, positions, slots, query_lens, seq_lens, tables, samples = [], [], [], [], [], [], []
        for chunk in chunks:
            seq = chunk.seq
            ids += seq.token_ids(chunk.start, chunk.end)
            positions += range(chunk.start, chunk.end)
            slots += self.blocks.slots(seq, chunk.start, chunk.end)
            query_lens.append(chunk.num_tokens)
            seq_lens.append(chunk.end)
            tables.append(seq.block_table)
            if chunk.samples:
                samples.append(len(ids) - 1)
        return ModelInputs(ids, positions, slots, query_lens, seq_lens, tables, samples)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """The batch in one pass; if that raises, each row alone, so that only the rows at fault fail."""
        try:
            return self.sampler.sample(logits, seqs)
        except Exception:  # noqa: BLE001 - isolate the row at fault below
            logger.exception("batched sampling failed; sampling the %d rows one by one", len(seqs))
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

    def _update(self, seqs: list[Sequence], sampled: SamplerOutput) -> list[SequenceOutput]:
        outputs = []
        for seq, token, logprob in zip(seqs, sampled.tokens, sampled.logprobs, strict=True):
            if token == FAILED:
                seq.error = seq.error or NAN_LOGITS
                logger.warning("request %d failed: %s", seq.id, seq.error)
                outputs.append(SequenceOutput(seq, None, None, "error", seq.error))
                self._finish(seq)
                continue
            seq.output_token_ids.append(token)
            reason = None
            if token in seq.stop_ids or (seq.matcher is not None and seq.matcher.terminated):
                reason = "stop"
            elif seq.num_generated >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
            outputs.append(SequenceOutput(seq, token, logprob, reason))
            if reason:
                self._finish(seq)
        return outputs

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.sampler.release(seq)
