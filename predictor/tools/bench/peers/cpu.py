"""Who used the CPU during a wave, from /proc: the server measured (its whole session: vLLM's engine core and
workers included), and everything else on the machine besides this process (the client). On a shared machine
the second number says how far a wave's figures are from what the server does with the cores to itself."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
QUIET_SAMPLE_S = 5.0


@dataclass(frozen=True)
class CpuUse:
    server_cores: float  # CPU-seconds of the server's processes per second of the wave
    others_cores: float  # everything else, this process (the client) excepted; hypervisor steal included


def machine_busy_s() -> float:
    """CPU-seconds the machine has spent busy (and stolen by the hypervisor) since boot, over all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICKS_PER_S


def session_cpu_s(session_id: int) -> float:
    """CPU-seconds of the live processes in a session (a server started with start_new_session)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[3]) == session_id:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS_PER_S


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """Start before a wave, stop after it: what the server and everything else used meanwhile."""

    def __init__(self, session_id: int | None):
        self.session_id = session_id
        self.began = time.monotonic()
        self.readings = self._read()

    def _read(self) -> tuple[float, float, float]:
        server = session_cpu_s(self.session_id) if self.session_id is not None else 0.0
        return machine_busy_s(), server, own_cpu_s()

    def stop(self) -> CpuUse:
        wall = max(time.monotonic() - self.began, 1e-9)
        busy, server, own = (after - before for after, before in zip(self._read(), self.readings))
        return CpuUse(server / wall, max(busy - server - own, 0.0) / wall)


def others_cores_now(sample_s: float = QUIET_SAMPLE_S) -> float:
    """What the rest of the machine uses over the next few seconds, while none of ours runs."""
    meter = CpuMeter(None)
    time.sleep(sample_s)
    return meter.stop().others_cores


def wait_for_quiet(max_others_cores: float, timeout_s: float) -> float:
    """Until the rest of the machine uses at most `max_others_cores`, or `timeout_s` passed; what it used last."""
    deadline = time.monotonic() + timeout_s
    others = others_cores_now()
    while others > max_others_cores and time.monotonic() < deadline:
        others = others_cores_now()
    return others
