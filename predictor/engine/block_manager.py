"""Fixed-size KV cache blocks: a free list, and each sequence's block table (its blocks in token order).

Block 0 is never handed out: padded rows of a captured decode step write their keys and values there.
"""

from __future__ import annotations

from collections import deque

from predictor.engine.sequence import Sequence

SCRATCH_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks - 1  # usable
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks the sequence lacks to hold its first num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_hold(self, seq: Sequence, num_tokens: int, keep_free: int = 0) -> bool:
        return self.missing(seq, num_tokens) <= self.num_free - keep_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.missing(seq, num_tokens)):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """The flat KV cache slots (block * block_size + offset) of token positions [start, end)."""
        size, table, slots = self.block_size, seq.block_table, []
        position = start
        while position < end:
            block_end = min(end, (position // size + 1) * size)
            base = table[position // size] * size - (position // size) * size
            slots += range(base + position, base + block_end)
            position = block_end
        return slots
