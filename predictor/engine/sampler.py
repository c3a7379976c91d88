"""The batched next-token sampler: every row's logits processing and its draw in one pass over [B, V] on the device.

Each row carries its own parameters as a column of per-row tensors (TGI's HeterogeneousNextTokenChooser is the
model): first the structured-output mask of the rows held to a grammar, then repetition / presence / frequency
penalties, min_new_tokens' stop-token ban, temperature, top-k, top-p and typical-p, then one exponential race
(argmax of p / Exp(1) noise, which draws from p) for all sampled rows. A processor runs only when some row of the
batch asks for it.

Sampling is total: work is in float32, temperature and penalties are clamped away from 0 and infinity, the most
likely token always survives top-p and typical-p, and a row whose distribution still vanishes falls back to its
argmax. A row whose model logits hold NaN comes back as FAILED, so that one request ends and the batch goes on,
as does a constrained row left with no token both its grammar and the model allow.

draw() does the device's part without making the host wait (the tokens stay on the device for async scheduling's
next step, and start their copy to the host); resolve() waits for them and does the host's part (grammars,
logprobs); sample() is both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from predictor.engine.model_inputs import upload
from predictor.engine.sampling_params import TokenLogprob
from predictor.engine.sequence import Sequence
from predictor.engine.structured_output import BatchMask

FAILED = -1  # the token of a row whose logits were not numbers
MIN_TEMPERATURE = 1e-5  # below this a temperature is as good as greedy and would overflow
PENALTY_RANGE = (1e-6, 1e6)  # repetition penalties beyond these only overflow float32
MIN_NOISE = 1e-20  # an exponential draw of exactly 0 would make 0/0
GRAMMAR_DEAD_END = "no token that the structured output's grammar allows is possible under the model"


@dataclass
class SamplerOutput:
    tokens: list[int]  # per row; FAILED where the model's logits were not numbers
    logprobs: list[TokenLogprob | None]  # per row, for the rows that asked


@dataclass
class Logprobs:
    """The log-probabilities the rows that asked get, in host memory once the draw's copy is complete."""

    rows: list[int]
    chosen: torch.Tensor  # [R]: of the drawn token (meaningless where it FAILED: that row reports none)
    top_values: torch.Tensor | None  # [R, most asked], None when no row asked for alternatives
    top_ids: torch.Tensor | None


@dataclass
class Draw:
    """A batch's tokens drawn on the device, on their way to the host: Sampler.resolve waits for them."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [B] int64 on the device; FAILED where the model's logits were not numbers
    host_tokens: torch.Tensor  # their copy in host memory, complete once `copied` has happened
    copied: torch.cuda.Event | None  # None on the CPU, where the copies are the tensors themselves
    logprobs: Logprobs | None  # of the rows that asked, copied with the tokens
    constrained: list[tuple[int, object]]  # (row, grammar matcher) of the rows held to a grammar
    dead_ends: torch.Tensor | None  # [B] bool: rows whose grammar allows nothing the model does


class Sampler:
    """Draws the next token of each running sequence; holds the per-row state: the token counts penalties read,
    and each constrained row's grammar matcher."""

    def __init__(self, vocab_size: int, max_rows: int, device: torch.device):
        self.vocab_size = vocab_size
        self.max_rows = max_rows
        self.device = device
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._output_counts: torch.Tensor | None = None  # [rows, V] int32, allocated with the first penalty
        self._prompt_seen: torch.Tensor | None = None  # [rows, V] bool
        self._grammar_mask: BatchMask | None = None  # allocated with the first constrained row

    # ---- row lifetime -----------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Give a sequence that starts (or resumes) sampling a row, built from the tokens it has so far."""
        seq.sampler_row = self._free_rows.pop()
        if seq.generator is None and seq.params.seed is not None and not seq.params.greedy:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed)
        if seq.params.penalized:
            counts, seen = self._penalty_state()
            row = seq.sampler_row
            counts[row].zero_()
            seen[row].zero_()
            seen[row, self._upload(seq.prompt_token_ids)] = True
            if seq.output_token_ids:
                output = self._upload(seq.output_token_ids)
                counts[row].index_add_(0, output, torch.ones_like(output, dtype=counts.dtype))
        if seq.grammar is not None:
            seq.matcher = seq.grammar.matcher(seq.output_token_ids, seq.params.max_new_tokens)

    def release(self, seq: Sequence) -> None:
        if seq.sampler_row is not None:
            self._free_rows.append(seq.sampler_row)
            seq.sampler_row = None
        seq.matcher = None

    def _penalty_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._output_counts is None:  # most servers never see a penalty: allocate at the first one
            shape = (self.max_rows, self.vocab_size)
            self._output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._prompt_seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
        return self._output_counts, self._prompt_seen

    # ---- one step -------------------------------------------------------------------------------------------

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """The next token of each row of logits [B, V]; row i belongs to seqs[i]."""
        return self.resolve(self.draw(logits, seqs))

    def draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> Draw:
        """The tokens of each row of logits [B, V], drawn on the device, the host not waiting for them (unless a
        row is held to a grammar: its mask is built on the host). Penalties' token counts are updated on the
        device, so that the next step's draw sees them before the host does."""
        params = [s.params for s in seqs]
        penalized = any(p.penalized for p in params)
        constrained = [(row, s.matcher) for row, s in enumerate(seqs) if s.matcher is not None]
        raw = logits.float()
        failed = torch.isnan(raw.amax(dim=-1))  # a NaN anywhere in a row is its maximum: one vectorized pass
        early_stops = self._early_stop_pairs(seqs)
        scores = raw
        if penalized or early_stops or constrained or not all(p.greedy for p in params):
            scores = torch.nan_to_num(raw, nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                                      neginf=float("-inf"))  # a copy: raw stays the model's, for logprobs
        if constrained:
            self._mask(scores).apply(scores, constrained)
            dead_ends = torch.isneginf(scores).all(dim=-1) & ~failed  # the grammar allows only what the model rules out
            failed = failed | dead_ends
        if penalized:
            scores = self._penalize(scores, seqs)
        if early_stops:
            scores = self._ban_early_stops(scores, early_stops)
        greedy_tokens = row_argmax(scores)
        if all(p.greedy for p in params):
            tokens = greedy_tokens
        else:
            tokens = self._draw(scores, seqs, greedy_tokens)
        tokens = torch.where(failed, FAILED, tokens)
        if penalized:
            self._count(tokens, seqs)
        logprobs = self._logprobs(raw, seqs, tokens)
        on_device = [tokens] + ([logprobs.chosen, logprobs.top_values, logprobs.top_ids] if logprobs else [])
        host, copied = _to_host([t for t in on_device if t is not None])
        if logprobs is not None:
            logprobs.chosen, *top = host[1:]
            logprobs.top_values, logprobs.top_ids = top or (None, None)
        return Draw(seqs, tokens, host[0], copied, logprobs, constrained, dead_ends if constrained else None)

    def resolve(self, draw: Draw) -> SamplerOutput:
        """The drawn tokens on the host (waiting for the device to have sampled them), grammars advanced, and the
        logprobs of the rows that asked."""
        if draw.copied is not None:
            draw.copied.synchronize()
        token_list = draw.host_tokens.tolist()
        seqs = draw.seqs
        if draw.constrained:
            dead = draw.dead_ends.tolist()
            for row, matcher in draw.constrained:
                if dead[row] or (token_list[row] != FAILED and not matcher.accept(token_list[row])):
                    seqs[row].error = GRAMMAR_DEAD_END
                    token_list[row] = FAILED
        return SamplerOutput(token_list, _token_logprobs(draw.logprobs, seqs, token_list))

    def _mask(self, scores: torch.Tensor) -> BatchMask:
        if self._grammar_mask is None:
            self._grammar_mask = BatchMask(self.max_rows, scores.shape[-1])
        return self._grammar_mask

    def _penalize(self, scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        counts, seen = self._penalty_state()
        rows = self._upload([s.sampler_row for s in seqs])
        row_counts = counts[rows]
        occurred = row_counts > 0
        repetition = self._column([s.params.repetition_penalty for s in seqs]).clamp(*PENALTY_RANGE)
        repeated = seen[rows] | occurred
        penalized = torch.where(scores < 0, scores * repetition, scores / repetition)
        scores = torch.where(repeated, penalized, scores)
        presence = self._column([s.params.presence_penalty for s in seqs])
        frequency = self._column([s.params.frequency_penalty for s in seqs])
        return scores - presence * occurred - frequency * row_counts

    def _early_stop_pairs(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """(row, token) for the stop tokens (EOS, stop_token_ids) of rows still short of min_new_tokens, counting
        their pending tokens (async scheduling); a row held to a grammar can only take EOS once its output is
        complete, and then nothing else."""
        return [(row, token) for row, s in enumerate(seqs)
                if s.num_generated + s.num_pending < s.params.min_new_tokens and s.matcher is None
                for token in s.stop_ids if token < self.vocab_size]

    def _ban_early_stops(self, scores: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
        rows, tokens = self._upload(pairs).unbind(dim=1)
        return scores.index_put((rows, tokens), torch.full((), float("-inf"), device=self.device))

    def _draw(self, scores: torch.Tensor, seqs: list[Sequence], greedy_tokens: torch.Tensor) -> torch.Tensor:
        params = [s.params for s in seqs]
        temperature = self._column([max(p.temperature, MIN_TEMPERATURE) if not p.greedy else 1.0 for p in params])
        scores = scores / temperature
        if any(p.top_k for p in params) or any(p.top_p < 1.0 for p in params):
            scores = self._keep_top_k_and_top_p(scores, params)
        if any(p.typical_p < 1.0 for p in params):
            scores = self._keep_typical(scores, params)
        probs = torch.softmax(scores, dim=-1)
        noise = self._exponential_noise(probs, seqs)
        drawn = row_argmax(probs / noise)
        vanished = torch.isnan(probs).any(dim=-1)  # every score was -inf: nothing left to draw from
        drawn = torch.where(vanished, greedy_tokens, drawn)
        greedy = self._upload([p.greedy for p in params])
        return torch.where(greedy, greedy_tokens, drawn)

    def _keep_top_k_and_top_p(self, scores: torch.Tensor, params) -> torch.Tensor:
        """Mask, in descending order, ranks past top_k and tokens past the top_p mass (the one crossing it stays)."""
        vocab = scores.shape[-1]
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        top_k = self._upload([p.top_k if p.top_k else vocab for p in params])
        ranks = torch.arange(vocab, device=self.device)
        drop = ranks[None, :] >= top_k[:, None]
        if any(p.top_p < 1.0 for p in params):
            probs = torch.softmax(sorted_scores.masked_fill(drop, float("-inf")), dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            drop |= mass_before >= self._column([p.top_p for p in params])
        drop[:, 0] = False
        return scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))

    def _keep_typical(self, scores: torch.Tensor, params) -> torch.Tensor:
        """Keep the tokens whose surprise is closest to the entropy, up to typical_p of the mass."""
        log_probs = torch.log_softmax(scores, dim=-1)
        probs = log_probs.exp()
        entropy = -(torch.nan_to_num(log_probs, neginf=0.0) * probs).sum(dim=-1, keepdim=True)
        distance = (-log_probs - entropy).abs()
        distance, order = distance.sort(dim=-1)
        sorted_probs = probs.gather(1, order)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= self._column([p.typical_p for p in params])
        drop[:, 0] = False
        drop = torch.zeros_like(drop).scatter(1, order, drop)
        return scores.masked_fill(drop, float("-inf"))

    def _exponential_noise(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Exp(1) noise per token from the device's generator; a seeded row draws its own from its generator, so
        its text depends on its seed alone, not on what else is in the batch."""
        noise = torch.empty_like(probs).exponential_()
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[row].exponential_(generator=seq.generator)
        return noise.clamp_(min=MIN_NOISE)

    def _count(self, tokens: torch.Tensor, seqs: list[Sequence]) -> None:
        counts, _ = self._penalty_state()
        rows = [i for i, s in enumerate(seqs) if s.params.penalized]
        chosen = tokens[self._upload(rows)]
        kept = chosen != FAILED  # a failed row adds 0 (no boolean indexing: that would wait for the device)
        sampler_rows = self._upload([seqs[i].sampler_row for i in rows])
        counts.index_put_((sampler_rows, chosen.clamp(min=0)), kept.to(counts.dtype), accumulate=True)

    def _logprobs(self, raw: torch.Tensor, seqs: list[Sequence], tokens: torch.Tensor) -> Logprobs | None:
        """Log-probabilities under the model's own (unprocessed) distribution, for the rows that asked, on the
        device."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return None
        index = self._upload(rows)
        log_probs = torch.log_softmax(raw[index], dim=-1)
        chosen = log_probs.gather(1, tokens[index].clamp(min=0)[:, None])[:, 0]
        most = max(seqs[r].params.logprobs for r in rows)
        top_values, top_ids = log_probs.topk(most, dim=-1) if most else (None, None)
        return Logprobs(rows, chosen, top_values, top_ids)

    def _upload(self, values: list) -> torch.Tensor:
        return upload(torch.tensor(values), self.device)

    def _column(self, values: list[float]) -> torch.Tensor:
        return upload(torch.tensor(values, dtype=torch.float32), self.device)[:, None]


def row_argmax(scores: torch.Tensor, block: int = 128) -> torch.Tensor:
    """scores.argmax(dim=-1) of [B, V]: the first maximum of each row (the first NaN where a row holds NaN). On
    the CPU torch's argmax does not vectorize (2.5-4 ms for 64 x 32,000 floats, as long as an fp32 decode step's
    attention over a short context) while amax does: the first block of `block` columns holding the row's maximum
    is found from the blocks' maxima, then the first maximum in that block, ~6x faster."""
    rows, vocab = scores.shape
    if scores.device.type != "cpu" or vocab < 4 * block:
        return scores.argmax(dim=-1)
    whole = vocab - vocab % block
    block_max = scores[:, :whole].view(rows, whole // block, block).amax(dim=-1)
    if whole < vocab:
        block_max = torch.cat([block_max, scores[:, whole:].amax(dim=-1, keepdim=True)], dim=1)
    columns = block_max.argmax(dim=-1, keepdim=True) * block + torch.arange(block)
    columns.clamp_(max=vocab - 1)  # the last block may be short: repeating its last column keeps the first maximum
    within = scores.gather(1, columns).argmax(dim=-1, keepdim=True)
    return columns.gather(1, within).squeeze(1)


def _to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """tensors copied to page-locked host memory without waiting, and the event after which the copies are complete:
    waiting for it waits for this step's sampling only, not for a step launched after it (async scheduling)."""
    if not tensors[0].is_cuda:
        return tensors, None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def _token_logprobs(logprobs: Logprobs | None, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
    """Each row's TokenLogprob, for the rows that asked and got a token."""
    result: list[TokenLogprob | None] = [None] * len(seqs)
    if logprobs is None:
        return result
    chosen = logprobs.chosen.tolist()
    top_values = logprobs.top_values.tolist() if logprobs.top_values is not None else None
    top_ids = logprobs.top_ids.tolist() if logprobs.top_ids is not None else None
    for i, row in enumerate(logprobs.rows):
        if tokens[row] == FAILED:
            continue
        k = seqs[row].params.logprobs
        top = list(zip(top_ids[i][:k], top_values[i][:k])) if k else []
        result[row] = TokenLogprob(tokens[row], chosen[i], top)
    return result
