"""The streaming load generator: N concurrent clients posting OpenAI streaming completions over one AsyncClient."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from predictor.tools.bench.workload import BenchRequest

TIMEOUT_S = 600.0


class ServerRefused(RuntimeError):
    """The server answered a benchmark request with an error status."""


@dataclass
class StreamResult:
    sent_at: float
    ttft_s: float | None = None  # until the first chunk carrying text
    gaps_s: list[float] = field(default_factory=list)  # between later text chunks
    completion_tokens: int = 0
    finish_reason: str | None = None
    cached_tokens: int | None = None  # prompt tokens the server's prefix cache held, when its usage says


@dataclass
class WaveResult:
    concurrency: int
    wall_s: float  # first request sent to last stream done
    streams: list[StreamResult]

    @property
    def generated_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.streams)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s

    @property
    def ttfts_s(self) -> list[float]:
        return [s.ttft_s for s in self.streams if s.ttft_s is not None]

    @property
    def itls_s(self) -> list[float]:
        return [gap for s in self.streams for gap in s.gaps_s]


@dataclass
class Target:
    url: str  # base URL, without /openai/v1
    model: str
    api_key: str | None = None
    include_usage: bool = True  # ask for the final usage chunk; turned off if the server refuses the field
    sampling: dict = field(default_factory=lambda: {"temperature": 0})  # greedy unless a wave says otherwise
    completions_path: str = "/openai/v1/completions"  # "/v1/completions": the route vLLM serves too

    @property
    def completions_url(self) -> str:
        return f"{self.url.rstrip('/')}{self.completions_path}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, request: BenchRequest, max_tokens: int | None = None, seed: int | None = None) -> dict:
        body = {"model": self.model, "prompt": request.prompt, "max_tokens": max_tokens or request.max_tokens,
                **self.sampling, "stream": True, "ignore_eos": True}
        if seed is not None:
            body["seed"] = seed
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        return body


def new_client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits)


async def stream_completion(client: httpx.AsyncClient, target: Target, request: BenchRequest,
                            max_tokens: int | None = None, seed: int | None = None) -> StreamResult:
    wanted = max_tokens or request.max_tokens
    result = StreamResult(sent_at=time.perf_counter())
    last_text_at, text_chunks, usage_tokens = None, 0, None
    async with client.stream("POST", target.completions_url, json=target.body(request, wanted, seed),
                             headers=target.headers) as response:
        if response.status_code != 200:
            raise ServerRefused(f"{response.status_code}: {(await response.aread()).decode(errors='replace')}")
        async for line in event_stream_lines(response.aiter_text()):
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                break
            now, chunk = time.perf_counter(), json.loads(payload)
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
                result.cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
            for choice in chunk.get("choices") or []:
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
                if not choice.get("text"):
                    continue
                text_chunks += 1
                if last_text_at is None:
                    result.ttft_s = now - result.sent_at
                else:
                    result.gaps_s.append(now - last_text_at)
                last_text_at = now
    result.completion_tokens = _completion_tokens(usage_tokens, result.finish_reason, wanted, text_chunks)
    return result


async def event_stream_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of a server-sent event stream, split at line ends only. Not httpx's aiter_lines: it splits like
    str.splitlines, at U+2028, U+0085 and others too, which JSON leaves unescaped inside a string (vLLM's chunks
    carry them raw when the model generates them)."""
    buffer = ""
    async for chunk in chunks:
        *lines, buffer = (buffer + chunk).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if buffer:
        yield buffer.removesuffix("\r")


def _completion_tokens(usage_tokens: int | None, finish_reason: str | None, wanted: int, text_chunks: int) -> int:
    """The usage chunk's count; without one, ignore_eos makes a 'length' finish exactly max_tokens."""
    if usage_tokens is not None:
        return usage_tokens
    return wanted if finish_reason == "length" else text_chunks


async def probe(target: Target, request: BenchRequest, max_tokens: int = 4) -> None:
    """A short streaming request: warms the server up and finds out whether it takes stream_options."""
    async with new_client(1) as client:
        try:
            await stream_completion(client, target, request, max_tokens)
        except ServerRefused as err:
            if not (target.include_usage and "stream_options" in str(err)):
                raise
            target.include_usage = False
            await stream_completion(client, target, request, max_tokens)


async def run_wave(target: Target, requests: list[BenchRequest], concurrency: int,
                   seeded: bool = False) -> WaveResult:
    """`concurrency` clients, each sending its share of `requests` one after another; seeded: request i asks for
    seed i."""
    async with new_client(concurrency) as client:

        async def one_client(share: list[tuple[int, BenchRequest]]) -> list[StreamResult]:
            return [await stream_completion(client, target, request, seed=index if seeded else None)
                    for index, request in share]

        start = time.perf_counter()
        numbered = list(enumerate(requests))
        shares = [numbered[i::concurrency] for i in range(concurrency)]
        per_client = await asyncio.gather(*(one_client(share) for share in shares))
        wall_s = time.perf_counter() - start
    return WaveResult(concurrency, wall_s, [stream for streams in per_client for stream in streams])
