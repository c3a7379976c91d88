"""Which tokens each engine step computes: pure policy over sequences and KV blocks, no torch.

Each step, oldest first, every running sequence gets its next token (a decode) or the next chunk of its prompt;
when a decode finds no free block, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed (prompt and output so far) when blocks free up; its stream
simply continues. Then waiting sequences are admitted first come, first served while there are free blocks, a
row in the batch (max_num_seqs) and prompt budget (max_prefill_tokens tokens per step); a prompt longer than
the budget is prefilled in chunks over several steps while the others keep decoding.

A sequence being admitted (or readmitted after a preemption) starts with the blocks the prefix cache holds of its
tokens: they cost neither budget nor blocks (unless they are free ones taken back), and it computes only the rest.
When the next block it would compute is being computed by a running sequence (n choices of one prompt, or a burst
of requests sharing a system prompt), it waits for that block, and so does the queue behind it, first come first
served: next step the block is cached and the prompt is computed once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from predictor.engine.block_manager import BlockManager
from predictor.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, end) of one sequence, computed this step; samples: the chunk reaches the sequence's end,
    so its last position yields the next token."""

    seq: Sequence
    start: int
    end: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, size: int) -> Chunk:
        end = seq.num_computed + size
        return cls(seq, seq.num_computed, end, end == seq.num_tokens)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class Step:
    chunks: list[Chunk] = field(default_factory=list)  # running sequences first, then the newly admitted
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_decode_only(self) -> bool:
        return all(c.num_tokens == 1 for c in self.chunks)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_prefill_tokens: int,
                 watermark_blocks: int = 0):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.watermark_blocks = watermark_blocks  # kept free at admission, so decodes rarely preempt
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, oldest first

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Remove a sequence wherever it is, freeing its blocks; None if it is not here (already finished)."""
        for seq in self.waiting:
            if seq.id == seq_id:
                self.waiting.remove(seq)
                self._finish(seq)
                return seq
        for seq in self.running:
            if seq.id == seq_id:
                self.running.remove(seq)
                self._finish(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """seq is done; it may have been preempted since its last token was sampled (async scheduling)."""
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> Step:
        step = Step()
        budget = self.max_prefill_tokens
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            todo = seq.num_tokens - seq.num_computed
            size = 1 if todo == 1 else min(todo, budget)
            if size == 0:  # a prompt chunk with no budget left this step, or (async scheduling) a sequence
                # whose last token is being sampled: nothing of it is left to compute
                index += 1
                continue
            if not self._make_room(seq, seq.num_computed + size, step):
                break  # seq itself was the newest and got preempted: nothing after it is left
            step.chunks.append(Chunk.of(seq, size))
            if todo > 1:
                budget -= size
            index += 1
        if not step.preempted:
            self._admit(step, budget)
        return step

    def _make_room(self, seq: Sequence, num_tokens: int, step: Step) -> bool:
        """Grow seq's blocks to num_tokens, preempting the newest running sequences if needed; False if seq
        itself had to go."""
        while not self.blocks.can_hold(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _admit(self, step: Step, budget: int) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            hit = self.blocks.lookup(seq)
            if hit.pending:
                break  # its next blocks are being computed: it takes them next step, rather than computing them too
            cached = len(hit.blocks) * self.blocks.block_size
            size = min(seq.num_tokens - cached, budget)
            keep_free = self.watermark_blocks if self.running else 0  # an idle engine admits whatever fits
            if not self.blocks.can_admit(hit, cached + size, keep_free=keep_free):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.admit(seq, hit)
            seq.num_computed = cached
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = cached
            self.blocks.grow(seq, cached + size)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.chunks.append(Chunk.of(seq, size))
            budget -= size

