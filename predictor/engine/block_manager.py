"""Fixed-size KV cache blocks: reference counts, each sequence's block table (its blocks in token order), and the
prefix cache.

Block 0 is never handed out: padded rows of a captured decode step write their keys and values there.

Prefix caching (vLLM's automatic prefix caching, nano-vllm's hashed blocks): a full block's hash covers its tokens
and the hash of the block before it, so equal hashes mean equal tokens from position 0 on. A block whose keys and
values are all written is registered under its hash; a sequence being admitted takes the longest chain of
registered blocks its tokens begin with and computes only the rest. A block is written only by the one sequence
that allocated it, before it is registered: a sequence writes positions past its cached prefix, into blocks it
alone holds, so shared blocks are never written. Freed blocks keep their content and hash in an LRU free queue,
reusable until an allocation evicts them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from predictor.engine.sequence import Sequence

SCRATCH_BLOCK = 0


@dataclass(eq=False)
class Block:
    id: int
    ref_count: int = 0  # sequences whose block table holds it
    hash: bytes | None = None  # the hash it is registered under: its tokens are known, its owner computes them
    computed: bool = False  # registered, and its keys and values all written: other sequences may share it


@dataclass(frozen=True)
class PrefixHit:
    """What the prefix cache holds of a sequence's tokens: computed blocks, in order, from the first."""

    blocks: list[int]
    revived: int  # how many of them are free (in the LRU queue): taking them uses up free blocks
    pending: bool  # the block after them is being computed by another sequence: better to wait for it


NO_HIT = PrefixHit([], 0, False)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks - 1  # usable
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))  # next to evict first
        self._registered: dict[bytes, Block] = {}

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds, cached content or not: all of them can be allocated."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def block(self, block_id: int) -> Block:
        return self._blocks[block_id]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks the sequence lacks to hold its first num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_hold(self, seq: Sequence, num_tokens: int, keep_free: int = 0) -> bool:
        return self.missing(seq, num_tokens) <= self.num_free - keep_free

    # ---- prefix cache -------------------------------------------------------------------------------------

    def lookup(self, seq: Sequence) -> PrefixHit:
        """The computed blocks seq's tokens begin with. Never all its tokens: the last one is always computed
        (its logits give the next token), so a block holding it is never looked up."""
        if not self.enable_caching:
            return NO_HIT
        blocks, revived = [], 0
        for block_hash in self._hashes(seq, (seq.num_known_tokens - 1) // self.block_size):
            block = self._registered.get(block_hash)
            if block is None:
                break
            if not block.computed:
                return PrefixHit(blocks, revived, pending=True)
            blocks.append(block.id)
            revived += block.ref_count == 0
        return PrefixHit(blocks, revived, pending=False)

    def can_admit(self, hit: PrefixHit, num_tokens: int, keep_free: int = 0) -> bool:
        """Whether a sequence taking hit's blocks can hold num_tokens tokens, keeping keep_free blocks free."""
        return self.blocks_for(num_tokens) - len(hit.blocks) <= self.num_free - hit.revived - keep_free

    def admit(self, seq: Sequence, hit: PrefixHit) -> None:
        """Start seq's (empty) block table with hit's blocks, shared with whoever else holds them."""
        for block_id in hit.blocks:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        seq.block_table = list(hit.blocks)

    def mark_computed(self, seq: Sequence, start: int, end: int) -> None:
        """Tokens [start, end) of seq now have their keys and values in its blocks: the blocks they filled up
        become shareable. Only known tokens are hashed: a block that a pending token (async scheduling) completes
        is marked when that token is known."""
        if not self.enable_caching:
            return
        size = self.block_size
        end = min(end, seq.num_known_tokens)
        hashes = self._hashes(seq, end // size)
        for index in range(start // size, end // size):
            block = self._blocks[seq.block_table[index]]
            if block.hash is None:
                self._register(block, hashes[index])
            block.computed = block.hash is not None  # else a twin block is registered: this one stays private

    # ---- allocation ---------------------------------------------------------------------------------------

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.missing(seq, num_tokens)):
            block = self._allocate()
            seq.block_table.append(block.id)
            index = len(seq.block_table) - 1
            if self.enable_caching and (index + 1) * self.block_size <= seq.num_known_tokens:
                # its tokens are known: registered now, so that a sequence beginning the same way waits for it
                self._register(block, self._hashes(seq, index + 1)[index])

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; those left unheld stay cached if computed, the chain's tail first in line for
        eviction, its head last."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count:
                continue
            self._free[block_id] = None
            if not block.computed:
                self._forget(block)
                self._free.move_to_end(block_id, last=False)  # nothing worth keeping: evicted before any other
        seq.block_table = []

    def _allocate(self) -> Block:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        return block

    def _register(self, block: Block, block_hash: bytes) -> None:
        if block_hash not in self._registered:
            self._registered[block_hash] = block
            block.hash = block_hash

    def _forget(self, block: Block) -> None:
        if block.hash is not None:
            del self._registered[block.hash]
        block.hash, block.computed = None, False

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The hashes of seq's first count full blocks (no more, though more may be known), each computed once per
        sequence."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < count:
            index = len(hashes)
            tokens = array("q", seq.token_ids(index * size, (index + 1) * size))
            hashes.append(hashlib.sha256((hashes[-1] if hashes else b"") + tokens.tobytes()).digest())
        return hashes[:count]

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
