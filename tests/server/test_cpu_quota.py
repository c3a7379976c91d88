"""The thread count follows a cgroup CPU quota (a Kubernetes CPU limit), read from cgroup v1 and v2 files laid
out as the kernel lays them out, for the cgroup /proc/self/cgroup names."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from predictor.cpu_quota import cgroup_cpu_quota, fit_threads_to_quota, usable_cores

CORES = len(os.sched_getaffinity(0))
V2_IN_NAMESPACE = "0::/\n"  # a container with its own cgroup namespace sees its cgroup as the root
V2_NESTED = "0::/kubepods/pod1/ctr\n"
V1 = "12:pids:/docker/ctr\n4:cpu,cpuacct:/docker/ctr\n2:memory:/docker/ctr\n"


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_quota_and_no_quota(tmp_path):
    write(tmp_path, "cpu.max", "150000 100000")
    assert cgroup_cpu_quota(tmp_path, V2_IN_NAMESPACE) == 1.5
    assert usable_cores(tmp_path, V2_IN_NAMESPACE) == min(CORES, 2)  # a part-core rounds up
    write(tmp_path, "cpu.max", "max 100000")
    assert cgroup_cpu_quota(tmp_path, V2_IN_NAMESPACE) is None
    assert usable_cores(tmp_path, V2_IN_NAMESPACE) == CORES


def test_cgroup_v2_tightest_of_the_cgroup_and_its_parents(tmp_path):
    write(tmp_path, "cpu.max", "max 100000")
    write(tmp_path, "kubepods/pod1/cpu.max", "300000 100000")
    write(tmp_path, "kubepods/pod1/ctr/cpu.max", "max 100000")
    assert cgroup_cpu_quota(tmp_path, V2_NESTED) == 3.0


def test_cgroup_v1_quota(tmp_path):
    controller = "cpu,cpuacct/docker/ctr"
    write(tmp_path, f"{controller}/cpu.cfs_period_us", "100000")
    write(tmp_path, f"{controller}/cpu.cfs_quota_us", "-1")
    assert cgroup_cpu_quota(tmp_path, V1) is None
    write(tmp_path, f"{controller}/cpu.cfs_quota_us", "50000")
    assert cgroup_cpu_quota(tmp_path, V1) == 0.5
    assert usable_cores(tmp_path, V1) == 1


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path, V1 + V2_IN_NAMESPACE) is None
    assert usable_cores(tmp_path, "") == CORES


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to set a quota under them")
def test_threads_fit_a_quota_under_the_affinity_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    write(tmp_path, "cpu.max", "100000 100000")
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert fit_threads_to_quota(tmp_path, V2_IN_NAMESPACE) is None  # the operator's choice wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert fit_threads_to_quota(tmp_path, V2_IN_NAMESPACE) == 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"  # what the processes this one starts inherit
    finally:
        torch.set_num_threads(threads)


def test_this_machines_own_cgroup_reads_without_error():
    """/proc/self/cgroup and /sys/fs/cgroup as they are here: whatever the quota, a count within the affinity."""
    code = "from predictor.cpu_quota import usable_cores; print(usable_cores())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 1 <= int(out) <= CORES
