"""A slot KV cache that plugs into any transformers model through the `Cache.update` hook.

Each running sequence owns one slot: a row of a preallocated [slots, kv_heads, max_len, head_dim] tensor
per layer. Running sequences are kept in slots 0..B-1 so a decode step attends over the view [:B] with no
gather; a finished sequence's slot is refilled by moving the last one into it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from predictor import model_facts
from predictor.loader import text_config_dict


class SlotKVCache(Cache):
    def __init__(self, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[])
        self.num_slots, self.max_len = num_slots, max_len
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows = slice(0, 0)
        self._write_positions: torch.Tensor | None = None  # decode: one position per row
        self._write_rows: torch.Tensor | None = None  # decode: the rows of a layer's flat [slots*heads*len, dim] view
        self._width = 0

    def set_prefill(self, slot: int, length: int) -> None:
        """The next forward writes positions [0, length) of one slot."""
        self._rows, self._write_positions, self._width = slice(slot, slot + 1), None, length

    def set_decode(self, positions: torch.Tensor) -> None:
        """The next forward writes one token per slot 0..B-1, each at its own position."""
        self._rows, self._write_positions, self._write_rows = slice(0, len(positions)), positions, None
        self._width = int(positions.max()) + 1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):
            self._allocate_layer(key_states)
        all_keys, all_values = self.keys[layer_idx], self.values[layer_idx]
        keys, values = all_keys[self._rows], all_values[self._rows]
        if self._write_positions is None:
            keys[:, :, : self._width] = key_states
            values[:, :, : self._width] = value_states
        else:
            # One row copy per (sequence, head) into the flat view: far cheaper than mixed slice/advanced indexing.
            rows = self._decode_rows(key_states.shape[1])
            all_keys.view(-1, all_keys.shape[-1]).index_copy_(0, rows, key_states.flatten(0, 2))
            all_values.view(-1, all_values.shape[-1]).index_copy_(0, rows, value_states.flatten(0, 2))
        return keys[:, :, : self._width], values[:, :, : self._width]

    def _decode_rows(self, heads: int) -> torch.Tensor:
        if self._write_rows is None:
            sequences = torch.arange(len(self._write_positions), device=self.device)
            head_rows = (sequences[:, None] * heads + torch.arange(heads, device=self.device)[None, :]) * self.max_len
            self._write_rows = (head_rows + self._write_positions[:, None]).flatten()
        return self._write_rows

    def _allocate_layer(self, key_states: torch.Tensor) -> None:
        shape = (self.num_slots, key_states.shape[1], self.max_len, key_states.shape[3])
        self.keys.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
        self.values.append(torch.zeros(shape, dtype=self.dtype, device=self.device))

    def move(self, src: int, dst: int, length: int) -> None:
        for keys, values in zip(self.keys, self.values):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self._width, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def kv_bytes_per_token(config, tp_size: int, dtype: torch.dtype) -> int:
    """K and V bytes one token takes on one rank, from the model config."""
    element = torch.tensor([], dtype=dtype).element_size()
    return model_facts.config_kv_bytes_per_token(text_config_dict(config), element, tp_size)
