"""The soak's abusive peers, alongside its clients: what no well-behaved client sends, each of which once slowed
everyone else down. A peer picks one at a time:

- slow headers: a request line, then a header byte every SLOW_BYTE_EVERY_S, never the blank line (slowloris);
  the server should answer 408 after its --header_timeout and close;
- huge header: a 1 MiB header line; the server should answer 431 having read at most --max_header_bytes;
- abandoned embeddings: many long texts to embed, the client gone after ABANDON_AFTER_S;
- big grammar: a chat completion whose response_format is a JSON schema with a GRAMMAR_ENUM-value enum.

Outcomes are tallied per kind like the clients' (an HTTP status, LEFT, TRANSPORT_ERROR), plus OPEN_AT_END for a slow
peer the run ended before the server closed it.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from predictor.tools.soak.clients import LEFT, TRANSPORT_ERROR, is_server_error
from predictor.tools.soak.mix import prompt

OPEN_AT_END = "open at the end"
SLOW_BYTE_EVERY_S = 0.5
HUGE_HEADER_BYTES = 2**20
ABANDON_AFTER_S = 0.3
EMBEDDING_INPUTS = 32
GRAMMAR_ENUM = 1000
ABUSES = ("slow headers", "huge header", "abandoned embeddings", "big grammar")


@dataclass
class AbuseTally:
    outcomes: dict[str, Counter] = field(default_factory=lambda: {abuse: Counter() for abuse in ABUSES})
    server_errors: list[dict] = field(default_factory=list)

    def add(self, abuse: str, outcome: int | str, text: str = "") -> None:
        self.outcomes[abuse][outcome] += 1
        if is_server_error(outcome) and len(self.server_errors) < 20:
            self.server_errors.append({"request": f"abusive: {abuse}", "outcome": outcome, "body": text[:300]})

    @property
    def total(self) -> int:
        return sum(sum(counts.values()) for counts in self.outcomes.values())

    def count(self, predicate) -> int:
        return sum(n for counts in self.outcomes.values() for outcome, n in counts.items() if predicate(outcome))


async def run_abusive_peers(url: str, model: str, api_key: str | None, peers: int, duration_s: float,
                            seed: int) -> AbuseTally:
    tally = AbuseTally()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + duration_s
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(120)) as http:
        await asyncio.gather(*(_peer(http, url, model, random.Random(seed * 1000 + 500 + i), deadline, tally)
                               for i in range(peers)))
    return tally


async def _peer(http: httpx.AsyncClient, url: str, model: str, rng: random.Random, deadline: float,
                tally: AbuseTally) -> None:
    while time.monotonic() < deadline:
        abuse = rng.choice(ABUSES)
        try:
            if abuse == "slow headers":
                outcome, text = await _slow_headers(url, deadline)
            elif abuse == "huge header":
                outcome, text = await _huge_header(url)
            elif abuse == "abandoned embeddings":
                outcome, text = await _abandoned_embeddings(http, model, rng)
            else:
                outcome, text = await _big_grammar(http, model, rng)
        except (OSError, httpx.TransportError, asyncio.IncompleteReadError) as err:
            outcome, text = TRANSPORT_ERROR, f"{type(err).__name__}: {err}"
        tally.add(abuse, outcome, text)


async def _slow_headers(url: str, deadline: float) -> tuple[int | str, str]:
    reader, writer = await _connect(url)
    try:
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: soak\r\nX-Slow: ")
        while time.monotonic() < deadline:
            writer.write(b"a")
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(4096), SLOW_BYTE_EVERY_S)
            except TimeoutError:
                continue
            return (_status(answer), answer.decode(errors="replace")) if answer else (TRANSPORT_ERROR, "closed")
        return OPEN_AT_END, ""
    finally:
        writer.close()


async def _huge_header(url: str) -> tuple[int | str, str]:
    reader, writer = await _connect(url)
    try:
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: soak\r\nX-Huge: " + b"a" * HUGE_HEADER_BYTES
                     + b"\r\n\r\n")
        try:
            await writer.drain()
        except ConnectionError:  # refused and closed before all of it was sent: the answer may still be there
            pass
        answer = await reader.read(4096)
        return (_status(answer), answer.decode(errors="replace")) if answer else (TRANSPORT_ERROR, "closed")
    finally:
        writer.close()


async def _abandoned_embeddings(http: httpx.AsyncClient, model: str, rng: random.Random) -> tuple[int | str, str]:
    body = {"model": model, "input": [prompt(rng) * 4 for _ in range(EMBEDDING_INPUTS)]}
    try:
        response = await asyncio.wait_for(http.post("/openai/v1/embeddings", json=body), ABANDON_AFTER_S)
    except TimeoutError:
        return LEFT, ""
    return response.status_code, response.text


async def _big_grammar(http: httpx.AsyncClient, model: str, rng: random.Random) -> tuple[int | str, str]:
    schema = {"type": "object", "required": ["pick"], "additionalProperties": False,
              "properties": {"pick": {"enum": [f"{rng.choice(('red', 'blue', 'green'))}-{i}"
                                               for i in range(GRAMMAR_ENUM)]}}}
    body = {"model": model, "messages": [{"role": "user", "content": prompt(rng)}], "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}}
    response = await http.post("/openai/v1/chat/completions", json=body)
    return response.status_code, response.text


async def _connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = urlsplit(url)
    return await asyncio.open_connection(address.hostname, address.port or 80)


def _status(answer: bytes) -> int | str:
    found = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return int(found.group(1)) if found else TRANSPORT_ERROR
