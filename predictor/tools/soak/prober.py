"""Readiness probes timed from a process of their own, so that the soak's clients (an event loop of their own,
busy) add nothing to the figure: `python -m predictor.tools.soak.prober URL SECONDS` prints the latencies, in
seconds, as a JSON list. Probes use one kept-alive connection, as a kubelet's do not, so that connecting is not
timed either."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

PROBE_EVERY_S = 0.05


def probe(url: str, duration_s: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + duration_s
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                ok = client.get("/v2/health/ready").status_code == 200
            except httpx.TransportError:
                ok = False
            latencies.append(time.perf_counter() - began if ok else math.inf)
            time.sleep(PROBE_EVERY_S)
    return latencies


@dataclass
class Prober:
    """The prober process, started before the load and read after it."""

    process: subprocess.Popen

    @classmethod
    def start(cls, url: str, duration_s: float) -> Prober:
        command = [sys.executable, "-m", "predictor.tools.soak.prober", url, str(duration_s)]
        return cls(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))

    def latencies(self) -> list[float]:
        out, _ = self.process.communicate(timeout=120)
        return json.loads(out) if self.process.returncode == 0 else []


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], float(sys.argv[2]))))
