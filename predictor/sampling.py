"""Per-request sampling parameters and the batched next-token sampler."""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """What one request asks of generation. Bounds are checked here so bad input is a 400 naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    typical_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted once per seen token.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted per occurrence.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives to report with each token.")
    stop: list[str] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no logits processing: the whole batch row is one argmax."""
        return self.greedy and not self.penalized


@dataclass
class TokenLogprob:
    """A chosen token's log-probability under the model, with the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class SequenceSampler:
    """Sampling state of one sequence: its generator (for seeds) and the tokens a penalty looks at."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], stop_ids: set[int], device: torch.device):
        self.params = params
        self.stop_ids = stop_ids
        self.seen = list(prompt_ids)  # what the repetition penalty looks at
        self.output_counts: Counter[int] = Counter()  # what presence and frequency penalties look at
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

    def choose(self, logits: torch.Tensor, generated: int) -> int:
        params = self.params
        logits = logits.float()
        if params.repetition_penalty != 1.0:
            logits = _penalize_repetition(logits, self.seen, params.repetition_penalty)
        if self.output_counts and (params.presence_penalty or params.frequency_penalty):
            logits = _penalize_presence_and_frequency(logits, self.output_counts, params)
        if generated < params.min_new_tokens and self.stop_ids:
            logits[list(self.stop_ids)] = float("-inf")
        if params.greedy:
            return int(logits.argmax())
        logits = logits / params.temperature
        if params.top_k:
            logits = _keep_top_k(logits, params.top_k)
        if params.top_p < 1.0:
            logits = _keep_top_p(logits, params.top_p)
        if params.typical_p < 1.0:
            logits = _keep_typical(logits, params.typical_p)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_batch(logits: torch.Tensor, samplers: list[SequenceSampler], generated: list[int]) -> list[int]:
    """Next token of every row; rows that need no processing share one argmax."""
    fast = [s.params.plain_greedy and g >= s.params.min_new_tokens for s, g in zip(samplers, generated)]
    tokens = logits.argmax(dim=-1).tolist() if any(fast) else [0] * len(samplers)
    for row, (sampler, count) in enumerate(zip(samplers, generated)):
        if not fast[row]:
            tokens[row] = sampler.choose(logits[row], count)
    for sampler, token in zip(samplers, tokens):
        if sampler.params.penalized:
            sampler.seen.append(token)
            sampler.output_counts[token] += 1
    return tokens


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Log-probabilities of the chosen tokens of `rows` under the model's own (unprocessed) distribution."""
    log_probs = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = log_probs.gather(1, torch.tensor([[tokens[r]] for r in rows], device=logits.device))[:, 0].tolist()
    most = max(tops)
    top_values, top_ids = log_probs.topk(most, dim=-1) if most else (None, None)
    result = []
    for i, (row, k) in enumerate(zip(rows, tops)):
        top = list(zip(top_ids[i, :k].tolist(), top_values[i, :k].tolist())) if k else []
        result.append(TokenLogprob(tokens[row], chosen[i], top))
    return result


def _penalize_presence_and_frequency(logits: torch.Tensor, counts: Counter[int], params: SamplingParams):
    ids = torch.tensor(list(counts), device=logits.device)
    occurrences = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    logits[ids] -= params.presence_penalty + params.frequency_penalty * occurrences
    return logits


def _penalize_repetition(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    ids = torch.tensor(seen, device=logits.device).unique()
    scores = logits[ids]
    logits[ids] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.numel())
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token crossing top_p
    return logits.masked_fill(_unsort(drop_sorted, order), float("-inf"))


def _keep_typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(torch.nan_to_num(log_probs) * probs).sum()
    surprise_gap = (-log_probs - entropy).abs()
    order = torch.argsort(surprise_gap)
    cumulative = probs[order].cumsum(dim=-1)
    drop_sorted = (cumulative - probs[order]) >= mass
    return logits.masked_fill(_unsort(drop_sorted, order), float("-inf"))


def _unsort(values_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Put values given in sorted order back at the positions `order` took them from."""
    return torch.empty_like(values_sorted).scatter_(0, order, values_sorted)
