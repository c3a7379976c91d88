"""The server's state as its /metrics tells it: requests running and waiting, KV cache in use, resident memory."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import httpx

GAUGES = {"running": "predictor_num_requests_running", "waiting": "predictor_num_requests_waiting",
          "kv_cache_usage": "predictor_kv_cache_usage_ratio", "rss_bytes": "process_resident_memory_bytes"}
SETTLE_TIMEOUT_S = 30


@dataclass
class ServerState:
    running: float | None
    waiting: float | None
    kv_cache_usage: float | None
    rss_bytes: float | None

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.kv_cache_usage == 0

    def as_dict(self) -> dict:
        return asdict(self)


def read_state(url: str) -> ServerState:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for key, name in GAUGES.items():
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        values[key] = float(found.group(1)) if found else None
    return ServerState(**values)


def settle(url: str, timeout_s: float = SETTLE_TIMEOUT_S) -> tuple[ServerState, float]:
    """The state once nothing runs, waits or holds KV (or at the timeout), and the seconds that took."""
    started = time.monotonic()
    while True:
        state = read_state(url)
        waited = time.monotonic() - started
        if state.idle or waited > timeout_s:
            return state, waited
        time.sleep(0.05)
