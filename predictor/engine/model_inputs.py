"""One step's forward as plain integers: built by the engine core, broadcast to tensor-parallel ranks as one
int64 tensor, executed by every rank's ModelRunner, which uploads it to the device without waiting."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch

HEADER = 5  # tokens, sequences, prefill sequences, block-table width, sampled positions


@dataclass
class ModelInputs:
    token_ids: list[int]  # [T]: the prefill chunks' tokens, then one token per decode
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T] where each token's keys and values go in the cache
    query_lens: list[int]  # [S] tokens per sequence; the first num_prefills are > 1, the rest are decodes (1)
    seq_lens: list[int]  # [S] context length after this step
    block_tables: list[list[int]]  # [S] the blocks holding each sequence's context
    sample_indices: list[int]  # positions in T whose logits the step returns (a chunk's last token)
    # Async scheduling: token ids the host does not know yet, filled on the device. Not packed: tensor parallelism
    # refuses async scheduling (its followers hold no sampled tokens).
    placeholders: Placeholders | None = field(default=None, compare=False)
    _packed: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_prefills(self) -> int:
        return sum(1 for n in self.query_lens if n > 1)

    @property
    def num_decodes(self) -> int:
        return len(self.query_lens) - self.num_prefills

    @property
    def query_starts(self) -> list[int]:
        return [0, *accumulate(self.query_lens)]

    @property
    def table_width(self) -> int:
        return max((len(t) for t in self.block_tables), default=0)

    def pack(self) -> torch.Tensor:
        """Everything in one int64 tensor: a header, then each field; block tables padded to one width."""
        if self._packed is None:
            self._packed = self._pack()
        return self._packed

    def _pack(self) -> torch.Tensor:
        width = self.table_width
        tables = [block for table in self.block_tables for block in (*table, *[0] * (width - len(table)))]
        header = [len(self.token_ids), len(self.query_lens), self.num_prefills, width, len(self.sample_indices)]
        return torch.tensor([*header, *self.token_ids, *self.positions, *self.slot_mapping, *self.query_lens,
                             *self.seq_lens, *tables, *self.sample_indices], dtype=torch.int64)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> ModelInputs:
        values = packed.tolist()
        tokens, seqs, _, width, samples = values[:HEADER]
        fields, offset = [], HEADER
        for size in (tokens, tokens, tokens, seqs, seqs, seqs * width, samples):
            fields.append(values[offset : offset + size])
            offset += size
        ids, positions, slots, query_lens, seq_lens, flat_tables, sample_indices = fields
        tables = [flat_tables[i * width : (i + 1) * width] for i in range(seqs)]  # padded: lengths bound reads
        return cls(ids, positions, slots, query_lens, seq_lens, tables, sample_indices)


@dataclass
class Placeholders:
    """Tokens of a step that the step before it sampled and the host has not seen yet (async scheduling): the step's
    token_ids[indices] are sampled[sources], taken from the previous step's sampled tokens on the device, so that
    the host need not wait for them."""

    indices: list[int]  # positions in the step's T tokens (their host ids are placeholders)
    sources: list[int]  # rows of sampled
    sampled: torch.Tensor  # [rows] int64 on the device: the previous step's tokens, FAILED (-1) where it failed

    def fill(self, token_ids: torch.Tensor) -> None:
        """Write the tokens into a device tensor of the step's token ids. A failed row's token becomes 0: its
        sequence ends when the host sees the failure, and an id of -1 would make the embedding read out of bounds."""
        index, source = upload(torch.tensor([self.indices, self.sources]), token_ids.device)
        token_ids[index] = self.sampled[source].clamp(min=0)


def copy_to_device(destination: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """Copy a host tensor into a device tensor without blocking the host: a copy from pageable memory waits for the
    transfer, so on CUDA the values go through page-locked memory (torch's caching host allocator reuses those
    buffers and keeps each one until its copy is done)."""
    if destination.is_cuda:
        host = host.pin_memory()
    return destination.copy_(host, non_blocking=True)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device, copied as copy_to_device copies."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
