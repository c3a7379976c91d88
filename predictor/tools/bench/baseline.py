"""One request at a time with `model.generate`: the strategy of Kaito's presets and KServe's HF backend."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from predictor.tools.bench.workload import BenchRequest


@dataclass
class BaselineResult:
    requests: int
    generated_tokens: int
    seconds: float  # prefill included: a one-at-a-time server spends it too
    token_ids: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds


@torch.inference_mode()
def run_one_at_a_time(model, requests: list[BenchRequest], pad_id: int) -> BaselineResult:
    seconds, token_ids = 0.0, []
    for request in requests:
        ids = torch.tensor([request.prompt_ids], device=model.device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad_id,
                             max_new_tokens=request.max_tokens, min_new_tokens=request.max_tokens)
        out = out.cpu()  # waits for the device
        seconds += time.perf_counter() - start
        token_ids.append(out[0, ids.shape[1]:].tolist())
    return BaselineResult(len(requests), sum(len(t) for t in token_ids), seconds, token_ids)
