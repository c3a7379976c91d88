"""glibc's malloc set to keep the memory a CPU forward frees, so that the next step's activations reuse it.

A forward on the CPU allocates its activations afresh at every step: a 2,048-token prefill step of the demo model
makes dozens of 4-11 MB tensors per layer. glibc hands sizes above its mmap threshold to the kernel (mmap, then
munmap on free) and trims the top of its heap once about twice that threshold lies free there, so the next step's
tensors fault their pages back in, each zeroed by the kernel: ~100,000-290,000 page faults per 64-stream wave of
the demo model in the engine process. Fixed thresholds keep those bytes in the heap, as tcmalloc does (vLLM's CPU
guide asks for it to be preloaded): ~1,000 faults per wave. The cost is that up to TRIM_THRESHOLD bytes the
engine freed stay resident. Set after the model is loaded, so that what loading alone needed is returned as
before; only on the CPU, where the activations live in host memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest: allocations above it still map and unmap their own pages
TRIM_THRESHOLD = 512 << 20
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> str | None:
    """Fix the thresholds and say so in the log; returns why they were left alone, None once set. The operator's
    own malloc settings (the environment's) win."""
    why_not = _set_thresholds()
    if why_not is None:
        logger.info("host memory: freed blocks below %d MiB stay in malloc's heap for the next step (up to %d MiB "
                    "of them kept)", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    else:
        logger.info("host memory: malloc left as it is: %s", why_not)
    return why_not


def _set_thresholds() -> str | None:
    if platform.libc_ver()[0] != "glibc":
        return "not glibc's malloc"
    chosen = [name for name in ENVIRONMENT if os.environ.get(name)]
    if chosen:
        return f"the environment sets {', '.join(chosen)}"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "mallopt refused the thresholds"
    return None
