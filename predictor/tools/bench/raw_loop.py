"""The compute limit: a batched greedy decode loop calling the model directly, and the time of one prefill."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, StaticCache

from predictor.tools.bench.workload import BenchRequest

PREFILL_REPEATS = 3
COMPILE_WARMUP_STEPS = 3  # compiling and recording the graph happen in the first calls


@dataclass
class RawLoopResult:
    concurrency: int
    prefill_s: float  # the whole batch, left-padded, in one forward
    decode_s: float
    decoded_tokens: int  # by the decode loop; the first token of each request comes from the prefill
    token_ids: list[list[int]]  # generated per request, in request order

    @property
    def tokens_per_s(self) -> float:
        return self.decoded_tokens / self.decode_s

    @property
    def tokens_per_s_with_prefill(self) -> float:
        """All generated tokens over prefill + decode: what the server's wave figure also pays for."""
        return (self.decoded_tokens + self.concurrency) / (self.prefill_s + self.decode_s)


def load_model(model_dir, device: str = "cpu", dtype: str = "float32"):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), device_map=device).eval()


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(sequence)
        mask[row, width - len(sequence):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def run_raw_loop(model, requests: list[BenchRequest], pad_id: int) -> RawLoopResult:
    """Prefill all prompts together, then one forward + argmax per step until each has its max_tokens.

    A static cache is written in place, as the server's slot cache is; a DynamicCache re-concatenates the whole
    cache every step, which on CPU costs as much as the forward and would understate the limit. Requests are
    ordered by max_tokens, longest first, so a finished one is always the last row and the batch shrinks by slicing.
    """
    order = sorted(range(len(requests)), key=lambda i: -requests[i].max_tokens)
    steps_left = [requests[i].max_tokens - 1 for i in order]
    ids, mask = left_pad([requests[i].prompt_ids for i in order], pad_id, model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + max(steps_left))

    start = _now(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    next_tokens = out.logits[:, -1].argmax(-1)
    prefill_s = _now(model) - start

    produced = [next_tokens]
    last_positions = positions[:, -1]
    start = _now(model)
    for step in range(max(steps_left)):
        active = sum(1 for left in steps_left if left > step)
        if active < len(next_tokens):
            _keep_rows(cache, active)
            next_tokens, mask, last_positions = next_tokens[:active], mask[:active], last_positions[:active]
        mask = torch.cat([mask, mask.new_ones(active, 1)], dim=1)
        last_positions = last_positions + 1
        out = model(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=last_positions[:, None],
                    past_key_values=cache, use_cache=True)
        next_tokens = out.logits[:, -1].argmax(-1)
        produced.append(next_tokens)
    decode_s = _now(model) - start

    per_step = [step_tokens.tolist() for step_tokens in produced]
    by_row = [[tokens[row] for tokens in per_step if row < len(tokens)] for row in range(len(order))]
    token_ids = [[] for _ in requests]
    for row, index in enumerate(order):
        token_ids[index] = by_row[row]
    return RawLoopResult(len(requests), prefill_s, decode_s, sum(steps_left), token_ids)


def _keep_rows(cache: StaticCache, rows: int) -> None:
    """Drop the batch rows from `rows` on; the views keep writing in place into the preallocated tensors."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:rows], layer.values[:rows]


@torch.inference_mode()
def run_compiled_loop(model, requests: list[BenchRequest], pad_id: int) -> RawLoopResult:
    """The same loop with the decode forward under torch.compile(mode="reduce-overhead"): CUDA graphs, the way
    gpt-fast and transformers' static-cache generation reach the GPU's speed. Every request decodes the same
    number of steps (the batch never shrinks), so one graph serves them all; its first steps compile it and are
    not timed."""
    steps = min(r.max_tokens for r in requests) - 1
    ids, mask = left_pad([r.prompt_ids for r in requests], pad_id, model.device)
    width = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=width + steps + COMPILE_WARMUP_STEPS)
    full_mask = torch.cat([mask, mask.new_zeros(len(requests), steps + COMPILE_WARMUP_STEPS)], dim=1)

    def decode(tokens, position_ids, attention_mask):  # the static cache tracks where it writes itself
        out = model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask,
                    past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1)

    compiled = torch.compile(decode, mode="reduce-overhead")
    start = _now(model)
    out = model(input_ids=ids, attention_mask=full_mask[:, :width], position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    next_tokens = out.logits[:, -1].argmax(-1)
    prefill_s = _now(model) - start
    last_positions, produced = positions[:, -1], [next_tokens]
    for step in range(steps + COMPILE_WARMUP_STEPS):
        if step == COMPILE_WARMUP_STEPS:
            start = _now(model)
        full_mask[:, width + step] = 1
        last_positions = last_positions + 1
        next_tokens = compiled(next_tokens[:, None], last_positions[:, None], full_mask).clone()
        produced.append(next_tokens)
    decode_s = _now(model) - start
    per_step = [tokens.tolist() for tokens in produced[: steps + 1]]
    token_ids = [[tokens[row] for tokens in per_step] for row in range(len(requests))]
    return RawLoopResult(len(requests), prefill_s, decode_s, steps * len(requests), token_ids)


def _now(model) -> float:
    """A timestamp after the device has finished what was queued (CUDA runs asynchronously)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


@torch.inference_mode()
def prefill_seconds(model, prompt_ids: list[int]) -> float:
    """Best-of-a-few time of one prompt's prefill and first greedy token: the floor under a single client's TTFT."""
    ids = torch.tensor([prompt_ids], device=model.device)
    times = []
    for _ in range(PREFILL_REPEATS):
        cache = StaticCache(config=model.config, max_cache_len=len(prompt_ids))
        start = _now(model)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1)
        times.append(_now(model) - start)
    return min(times)


def median_prefill_seconds(model, requests: list[BenchRequest]) -> float:
    return statistics.median(prefill_seconds(model, r.prompt_ids) for r in requests)
