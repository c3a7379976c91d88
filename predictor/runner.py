"""Forward passes over the slot KV cache: prefill one prompt into a slot, decode one token for every slot."""

from __future__ import annotations

import inspect

import torch

from predictor.kv_cache import SlotKVCache


class ModelRunner:
    def __init__(self, model, num_slots: int, max_len: int):
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.cache = SlotKVCache(num_slots, max_len, self.dtype, self.device)
        self._masked = torch.finfo(self.dtype).min
        self._keeps_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        """Fill `slot` with the prompt's keys and values; return the logits [V] of its last token."""
        length = len(token_ids)
        self.cache.set_prefill(slot, length)
        ids = torch.tensor([token_ids], device=self.device)
        positions = torch.arange(length, device=self.device)
        causal = positions[None, :] <= positions[:, None]
        mask = self._additive(causal)[None, None]
        extra = {"logits_to_keep": 1} if self._keeps_last_logits else {}
        out = self.model(
            input_ids=ids, position_ids=positions[None], attention_mask=mask,
            past_key_values=self.cache, use_cache=True, **extra,
        )
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One step for slots 0..B-1: token i sits at positions[i] of slot i. Returns logits [B, V]."""
        pos = torch.tensor(positions, device=self.device)
        self.cache.set_decode(pos)
        visible = torch.arange(int(pos.max()) + 1, device=self.device)[None, :] <= pos[:, None]
        mask = self._additive(visible)[:, None, None, :]
        ids = torch.tensor(token_ids, device=self.device)[:, None]
        out = self.model(
            input_ids=ids, position_ids=pos[:, None], attention_mask=mask, past_key_values=self.cache, use_cache=True
        )
        return out.logits[:, -1]

    @torch.inference_mode()
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Mean of the last hidden states over the prompt, L2-normalised: [H] on the CPU. Leaves the cache alone."""
        ids = torch.tensor([token_ids], device=self.device)
        hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.float().mean(dim=0), dim=0).cpu()

    @torch.inference_mode()  # followers in tensor parallelism replay this outside the engine's inference mode
    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~visible, self._masked)

    def heartbeat(self) -> None:
        """Single process: nobody to tell that we are alive."""
