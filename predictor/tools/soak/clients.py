"""N concurrent clients sending the mix for T seconds; each answer is tallied by request kind and outcome.

An outcome is the HTTP status, or one of: LEFT (the client hung up first, on purpose: mid-stream, or before a
non-streamed answer came), STREAM_ERROR (a 200 stream, or a worker answer, that carries a server error), or
TRANSPORT_ERROR (no answer at all: the connection was refused or cut by the server).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from predictor.tools.soak.mix import KINDS, Kind

LEFT = "client left"
STREAM_ERROR = "200 with an error"
TRANSPORT_ERROR = "no answer"
LEAVE_WITHIN_S = (0.05, 1.0)  # a leaving client hangs up this long after sending (non-streamed requests)
REQUEST_TIMEOUT_S = 120
SAMPLES_KEPT = 20


@dataclass
class Tally:
    outcomes: dict[str, Counter] = field(default_factory=lambda: {kind.name: Counter() for kind in KINDS})
    server_errors: list[dict] = field(default_factory=list)  # a sample of 5xx, errors in 200s, lost connections
    unexpected: list[dict] = field(default_factory=list)  # well-formed requests refused, bad ones served
    wall_s: float = 0.0

    def add(self, kind: Kind, outcome: int | str, text: str = "") -> None:
        self.outcomes[kind.name][outcome] += 1
        if is_server_error(outcome) and len(self.server_errors) < SAMPLES_KEPT:
            self.server_errors.append({"request": kind.name, "outcome": outcome, "body": text[:300]})
        refused = isinstance(outcome, int) and 400 <= outcome < 500 and outcome != 429
        served = isinstance(outcome, int) and outcome < 300
        if (refused and not kind.bad or served and kind.bad) and len(self.unexpected) < SAMPLES_KEPT:
            self.unexpected.append({"request": kind.name, "outcome": outcome, "body": text[:300]})

    @property
    def total(self) -> int:
        return sum(sum(counts.values()) for counts in self.outcomes.values())

    def count(self, predicate) -> int:
        return sum(n for counts in self.outcomes.values() for outcome, n in counts.items() if predicate(outcome))


def is_server_error(outcome: int | str) -> bool:
    return outcome in (STREAM_ERROR, TRANSPORT_ERROR) or isinstance(outcome, int) and outcome >= 500


async def run_clients(url: str, model: str, api_key: str | None, clients: int, duration_s: float,
                      disconnect_rate: float, seed: int) -> Tally:
    tally = Tally()
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as http:
        started = time.monotonic()
        deadline = started + duration_s
        await asyncio.gather(*(_client(http, model, random.Random(seed * 1000 + i), deadline, disconnect_rate, tally)
                               for i in range(clients)))
        tally.wall_s = time.monotonic() - started
    return tally


async def _client(http: httpx.AsyncClient, model: str, rng: random.Random, deadline: float, disconnect_rate: float,
                  tally: Tally) -> None:
    weights = [kind.weight for kind in KINDS]
    while time.monotonic() < deadline:
        kind = rng.choices(KINDS, weights)[0]
        body = kind.body(rng, model)
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        path = kind.path.format(model=model)
        leaves = not kind.bad and rng.random() < disconnect_rate
        try:
            if leaves:
                outcome, text = await _leave_early(http, kind, path, content, rng)
            else:
                outcome, text = await _send(http, kind, path, content)
        except httpx.TransportError as err:
            outcome, text = TRANSPORT_ERROR, f"{type(err).__name__}: {err}"
        tally.add(kind, outcome, text)


async def _send(http: httpx.AsyncClient, kind: Kind, path: str, content: bytes) -> tuple[int | str, str]:
    response = await http.post(path, content=content)
    text = response.text
    if response.status_code == 200 and _carries_error(kind, path, text):
        return STREAM_ERROR, text[-300:]
    return response.status_code, text


async def _leave_early(http: httpx.AsyncClient, kind: Kind, path: str, content: bytes,
                       rng: random.Random) -> tuple[int | str, str]:
    """Streams: hang up after the first chunk. Otherwise: hang up after a moment, unless answered by then."""
    if kind.streams:
        async with http.stream("POST", path, content=content) as response:
            if response.status_code != 200:
                return response.status_code, (await response.aread()).decode(errors="replace")
            async for _ in response.aiter_raw():
                break
        return LEFT, ""
    try:
        return await asyncio.wait_for(_send(http, kind, path, content), rng.uniform(*LEAVE_WITHIN_S))
    except TimeoutError:
        return LEFT, ""


def _carries_error(kind: Kind, path: str, text: str) -> bool:
    """A 200 that reports a failure inside: an OpenAI stream's error chunk, a worker's non-zero error_code."""
    if path.startswith("/worker_generate"):
        try:
            return any(json.loads(piece).get("error_code") for piece in text.split("\0") if piece.strip())
        except ValueError:
            return True  # not the JSON objects the worker routes answer
    return kind.streams and '"error"' in text and "server_error" in text
