"""The engine process keeps the memory a step frees: the next step's activations reuse it without page faults.
Each case runs in a fresh interpreter, whose malloc nothing else has tuned."""

import json
import os
import subprocess
import sys

import pytest

from predictor.host_memory import TRIM_THRESHOLD

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")

# A step's worth of activations: ten 8 MiB buffers, written (as a tensor's output is), then all freed; five steps.
# Returns the page faults of each step.
STEPS = """
import json, resource, sys
from predictor.host_memory import keep_freed_memory
why_not = keep_freed_memory() if sys.argv[1] == "tuned" else "untuned"
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [bytearray(8 << 20) for _ in range(10)]
    del activations
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"why_not": why_not, "faults": faults}))
"""
PAGES_PER_STEP = 10 * (8 << 20) // os.sysconf("SC_PAGE_SIZE")


def run_steps(mode: str, env: dict[str, str] | None = None) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    run = subprocess.run([sys.executable, "-c", STEPS, mode], env={**environment, **(env or {})},
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_tuned_process_reuses_a_freed_step_without_faulting_it_in_again():
    untuned, tuned = run_steps("untuned"), run_steps("tuned")
    assert tuned["why_not"] is None
    # Without: every step faults its 80 MiB in again (malloc gave the pages back when the step freed them).
    assert min(untuned["faults"]) > PAGES_PER_STEP * 0.9, untuned
    # With: the first step faults them in, the later ones find them in the heap.
    assert tuned["faults"][0] > PAGES_PER_STEP * 0.9, tuned
    assert max(tuned["faults"][1:]) < PAGES_PER_STEP * 0.05, tuned
    assert 10 * (8 << 20) < TRIM_THRESHOLD  # what the test frees is within what the heap keeps


def test_the_operators_malloc_settings_win():
    chosen = run_steps("tuned", {"MALLOC_TRIM_THRESHOLD_": "0"})
    assert chosen["why_not"] == "the environment sets MALLOC_TRIM_THRESHOLD_"
    assert min(chosen["faults"]) > PAGES_PER_STEP * 0.9  # trimmed at every free, as that setting asks
