"""How many cores this process may keep busy: its CPU affinity, capped by its cgroup's CPU quota.

A Kubernetes CPU limit is a CFS quota, which neither OpenMP nor torch sees: they size their thread pools to the
cores the affinity mask allows, the node's, so a pod limited to 4 cores on a 64-core node runs 64 threads that
exhaust the quota early in each 100 ms period and then all wait for the next one (vLLM's CPU backend and
PyTorch's own issues report the same). Sized to the quota, the threads run without being throttled.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT, membership: str | None = None) -> int:
    return _capped(len(os.sched_getaffinity(0)), cgroup_cpu_quota(cgroup_root, membership))


def _capped(cores: int, quota: float | None) -> int:
    """A part-core rounds up: the quota lets a thread run some of each period."""
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The tightest quota, in cores (quota / period), of this process's cgroup and its ancestors; None without one.
    membership is /proc/self/cgroup's text: which cgroup the process is in (just "/" in a container with its own
    cgroup namespace). cgroup v2 keeps "<quota|max> <period>" in cpu.max; v1 keeps cpu.cfs_quota_us (-1: none) and
    cpu.cfs_period_us in its cpu controller's hierarchy."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    quotas = []
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2's unified hierarchy
            quotas += [_v2_quota(cgroup_root / d / "cpu.max") for d in _ancestry(path)]
        elif "cpu" in controllers.split(","):
            quotas += [_v1_quota(cgroup_root / controllers / d) for d in _ancestry(path)]
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _ancestry(path: str) -> list[str]:
    """A cgroup's directory and its parents' up to the root, relative: /a/b -> a/b, a, ''."""
    parts = [p for p in path.split("/") if p]
    return ["/".join(parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def fit_threads_to_quota(cgroup_root: Path = CGROUP_ROOT, membership: str | None = None) -> int | None:
    """Size torch's intra-op threads, and OMP_NUM_THREADS for the processes this one starts, to the usable cores
    when a quota leaves fewer than the affinity mask; an OMP_NUM_THREADS already set wins. Returns the new thread
    count, or None if nothing changed."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    affinity = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cgroup_root, membership)
    cores = _capped(affinity, quota)
    if cores >= affinity:
        return None
    os.environ["OMP_NUM_THREADS"] = str(cores)
    torch = sys.modules.get("torch")
    if torch is not None:  # already loaded: its OpenMP runtime read the variable then
        torch.set_num_threads(cores)
    logger.info("torch threads: %d, the cgroup CPU quota (%.2f cores) being under the %d cores of the CPU affinity",
                cores, quota, affinity)
    return cores
