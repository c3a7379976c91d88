"""`llm-predictor bench --shared_prefix_tokens N`: what the prefix cache saves a request whose prompt begins
with an earlier one's, as chat traffic does (a system prompt, earlier turns).

Each trial sends a prompt of N tokens, then that prompt plus a short suffix, one after the other, and takes each
one's time to first token; prompts of later trials begin elsewhere in the text, so only the second of a pair can
find its prefix cached. A local run measures a server with prefix caching and one without, one after the other.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from predictor.tools.bench import client, server
from predictor.tools.bench.workload import BenchRequest, build_workload

logger = logging.getLogger(__name__)

SUFFIX = " What happened next?"
TRIALS = 3
NEW_TOKENS = 2


@dataclass
class PrefixResult:
    label: str  # the server measured: "prefix caching on", "off", or "as served"
    first_ttfts_s: list[float]  # the N-token prompt
    second_ttfts_s: list[float]  # the same prompt and a suffix, right after it
    second_cached_tokens: list[int | None]  # what the server's usage said it found cached of the second's prompt

    @property
    def first_s(self) -> float:
        return statistics.median(self.first_ttfts_s)

    @property
    def second_s(self) -> float:
        return statistics.median(self.second_ttfts_s)

    @property
    def ratio(self) -> float:
        return self.second_s / self.first_s


def prefix_pairs(tokenizer, prefix_tokens: int, seed: int) -> list[tuple[BenchRequest, BenchRequest]]:
    """TRIALS (prompt, prompt + suffix) pairs; an extra first pair warms the server up."""
    prompts = build_workload(tokenizer, TRIALS + 1, (prefix_tokens, prefix_tokens), (NEW_TOKENS, NEW_TOKENS), seed)
    return [(p, BenchRequest(p.prompt + SUFFIX, tokenizer(p.prompt + SUFFIX).input_ids, NEW_TOKENS))
            for p in prompts]


async def measure(target: client.Target, pairs: list[tuple[BenchRequest, BenchRequest]], label: str) -> PrefixResult:
    firsts, seconds, cached = [], [], []
    async with client.new_client(1) as http:
        for trial, (first, second) in enumerate(pairs):
            results = [await client.stream_completion(http, target, request) for request in (first, second)]
            if trial == 0:
                continue  # warm-up
            firsts.append(results[0].ttft_s)
            seconds.append(results[1].ttft_s)
            cached.append(results[1].cached_tokens)
    result = PrefixResult(label, firsts, seconds, cached)
    logger.info("%s: TTFT %.0f ms, then %.0f ms with the prefix shared (%.2fx)", label, result.first_s * 1000,
                result.second_s * 1000, result.ratio)
    return result


def run(args, tokenizer, model_dir: Path | None, server_flags: list[str], run_dir: Path) -> list[PrefixResult]:
    pairs = prefix_pairs(tokenizer, args.shared_prefix_tokens, args.seed)
    if args.url:
        return [asyncio.run(measure(client.Target(args.url, args.model, args.api_key), pairs, "as served"))]
    results = []
    for label, flag in (("prefix caching on", "--enable_prefix_caching"),
                        ("prefix caching off", "--no-enable_prefix_caching")):
        local = server.start(run_dir / f"server-{label.split()[-1]}.log", model_dir, args.model, [*server_flags, flag])
        try:
            results.append(asyncio.run(measure(client.Target(local.url, args.model), pairs, label)))
        finally:
            local.stop()
    return results


def table(results: list[PrefixResult], prefix_tokens: int) -> str:
    lines = [f"Time to first token, {prefix_tokens}-token prompt then the same prompt + a short suffix "
             f"(median of {TRIALS}):", "",
             "| server | first (ms) | second (ms) | second / first | second's cached tokens |", "|---|---|---|---|---|"]
    lines += [f"| {r.label} | {r.first_s * 1000:.0f} | {r.second_s * 1000:.0f} | {r.ratio:.2f} | "
              f"{min(r.second_cached_tokens, key=lambda n: n or 0)} |" for r in results]
    return "\n".join(lines) + "\n"
