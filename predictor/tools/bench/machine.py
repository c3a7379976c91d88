"""What the numbers were measured on: CPU, cores, threads, library versions, date."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average: above the core count, other work shared the cores and the numbers are noisy."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def describe(load_at_start: float | None = None) -> dict[str, str]:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu_model()}, {usable_cores()} usable cores ({os.cpu_count()} online)",
        "gpu": gpu,
        "torch": f"{torch.__version__}, {torch.get_num_threads()} intra-op threads",
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load average (1 min)": f"{_fmt_load(load_at_start)} at start, {_fmt_load(load_average())} at end",
    }


def _fmt_load(load: float | None) -> str:
    return "n/a" if load is None else f"{load:.2f}"


def copy_bandwidth_bytes_per_s(device: str, size_bytes: int = 2**30, repeats: int = 10) -> float:
    """Device memory bandwidth as a large copy sees it (bytes read + written per second): the roofline's rate."""
    import time

    import torch

    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size_bytes * repeats / (time.perf_counter() - start)
