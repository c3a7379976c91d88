"""The paged KV cache: per layer, keys and values as [num_blocks, block_size, kv_heads, head_dim] tensors.

It plugs into any transformers model as its `past_key_values`: `update` writes the step's new keys and values
into their slots (slot_mapping, set by the runner before each forward). For models on the paged attention
function it returns them unchanged (the attention reads the blocks itself); for the mask layout it returns each
sequence's gathered context, for the model's own attention and the runner's 4D mask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from predictor.engine.attention import gather_context


class PagedKVCache(Cache):
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[])
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slot_mapping: torch.Tensor | None = None  # [T] where the next forward's tokens go, set per forward
        self.mask_layout: MaskLayout | None = None  # set for models that attend with their own code

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key_states [batch, kv_heads, tokens, dim]: the step's tokens, in slot_mapping order."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        new_keys = key_states.transpose(1, 2).flatten(0, 1)  # [T, kv_heads, dim]
        new_values = value_states.transpose(1, 2).flatten(0, 1)
        slots = self.slot_mapping
        keys.view(-1, *keys.shape[2:]).index_copy_(0, slots, new_keys)
        values.view(-1, *values.shape[2:]).index_copy_(0, slots, new_values)
        if self.mask_layout is None:
            return key_states, value_states
        return self.mask_layout.context(keys), self.mask_layout.context(values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.mask_layout.width if self.mask_layout else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx), 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class MaskLayout:
    """For models with their own attention code: what each row of the forward attends to, as gathered keys.

    batched: one row per sequence (decodes), each row's blocks gathered and padded to the longest (the runner's
    mask hides the padding); packed: all sequences in one row (prefill chunks), their contexts concatenated and
    attended through a block-diagonal causal mask.
    """

    def __init__(self, block_tables: torch.Tensor, seq_lens: list[int], block_size: int, packed: bool):
        self.block_tables, self.seq_lens, self.packed = block_tables, seq_lens, packed
        self.num_blocks = -(-max(seq_lens) // block_size)
        self.width = sum(seq_lens) if packed else self.num_blocks * block_size

    def context(self, cache: torch.Tensor) -> torch.Tensor:
        if self.packed:
            parts = [gather_context(cache, table, n) for table, n in zip(self.block_tables, self.seq_lens)]
            return torch.cat(parts)[None].transpose(1, 2)  # [1, kv_heads, sum(lens), dim]
        gathered = cache[self.block_tables[:, : self.num_blocks]].flatten(1, 2)
        return gathered.transpose(1, 2)  # [rows, kv_heads, width, dim]
