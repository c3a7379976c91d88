"""The peer benchmark's prompts: distinct ones, which leave a prefix cache nothing to reuse, and ones that share
one long prefix (a system prompt, a document asked several questions)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from predictor.tools.bench.workload import PARAGRAPH, BenchRequest, prompt_of_length, words_from

WORDS = PARAGRAPH.split()


def distinct_prompts(tokenizer, tag: str, count: int, prompt_tokens: int, max_tokens: int) -> list[BenchRequest]:
    """`count` prompts of exactly `prompt_tokens` tokens; each opens with '<tag> <i>:', so no two share even a
    first KV block, and prompts of another tag (another wave) share none either."""
    rng = random.Random(tag)
    requests = []
    for index in range(count):
        text = f"{tag} {index}: {words_from(WORDS, rng.randrange(len(WORDS)), prompt_tokens)}"
        prompt, prompt_ids = prompt_of_length(tokenizer, text, prompt_tokens)
        requests.append(BenchRequest(prompt, prompt_ids, max_tokens))
    return requests


def shared_prefix_prompts(tokenizer, tag: str, count: int, prefix_tokens: int, suffix_tokens: int,
                          max_tokens: int) -> list[BenchRequest]:
    """`count` prompts whose first `prefix_tokens` token ids are the same (a prefix opening with '<tag>:') and
    whose last `suffix_tokens` differ from their first token on ('Question <i>: ...')."""
    rng = random.Random(tag)
    prefix, prefix_ids = prompt_of_length(tokenizer, f"{tag}: {words_from(WORDS, 0, prefix_tokens)}", prefix_tokens)
    requests = []
    for index in range(count):
        text = f"{prefix} Question {index}: {words_from(WORDS, rng.randrange(len(WORDS)), suffix_tokens)}"
        prompt, prompt_ids = prompt_of_length(tokenizer, text, prefix_tokens + suffix_tokens)
        if prompt_ids[:prefix_tokens] != prefix_ids:
            raise ValueError(f"prompt {index} of {tag!r} does not tokenize to the shared prefix's ids")
        requests.append(BenchRequest(prompt, prompt_ids, max_tokens))
    return requests


@dataclass
class PeerWorkload:
    """Everything one server is sent, in order; built once per model so that every server gets the same prompts."""

    warm_up: list[BenchRequest]  # as many distinct short requests as the largest wave has streams
    pair: list[BenchRequest]  # two prompts sharing a prefix no other prompt has: sent one after the other
    plain: dict[int, list[BenchRequest]]  # streams -> that wave's distinct prompts
    prefix_warm_up: BenchRequest  # puts the shared prefix in a prefix cache before the shared-prefix waves
    prefix: dict[int, list[BenchRequest]]  # streams -> that wave's prompts: the shared prefix, each its own suffix


def build(tokenizer, streams: list[int], min_wave_requests: int, prompt_tokens: int, max_tokens: int,
          prefix_tokens: int, suffix_tokens: int, prefix_max_tokens: int) -> PeerWorkload:
    """A wave of N streams sends max(N, min_wave_requests) requests; no prompt is sent twice."""
    sizes = {count: max(count, min_wave_requests) for count in streams}
    shared = shared_prefix_prompts(tokenizer, "Shared", 1 + sum(sizes.values()), prefix_tokens, suffix_tokens,
                                   prefix_max_tokens)
    prefix, start = {}, 1
    for count, size in sizes.items():
        prefix[count], start = shared[start:start + size], start + size
    return PeerWorkload(
        warm_up=distinct_prompts(tokenizer, "Warm-up", max(streams), prompt_tokens, 2),
        pair=shared_prefix_prompts(tokenizer, "Pair", 2, prefix_tokens, suffix_tokens, prefix_max_tokens),
        plain={count: distinct_prompts(tokenizer, f"Wave {count}", size, prompt_tokens, max_tokens)
               for count, size in sizes.items()},
        prefix_warm_up=shared[0],
        prefix=prefix,
    )
