"""The CPU's decode attention: a small C kernel (csrc/paged_decode_cpu.c) that reads each decode's KV blocks in
place, compiled on first use with the machine's C compiler and loaded with ctypes.

Attending decodes one by one with torch's SDPA copies every sequence's context out of its blocks first, per layer
(index_select), then reads the copy: at 64 decodes of ~150 tokens on the demo model, those copies and the small
SDPA calls were over half of a decode step. The kernel reads each block once, straight from the cache.

Built once per source and CPU (the shared object is cached under PREDICTOR_KERNEL_CACHE, else the user's cache
directory, else the temporary one) with -fopenmp: it then shares the OpenMP runtime and thread count that torch
loaded, libgomp.so.1. Without a compiler the runner keeps the copying path and says why, in one log line.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode_cpu.c"
# Reassociating sums lets the dot products and the softmax's sums vectorize; unlike -ffast-math it keeps infinities
# and NaN (the online softmax starts from -inf, and a NaN must reach the sampler).
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
                 "-fassociative-math", "-fno-signed-zeros")
MAX_GROUP, MAX_HEAD_DIM, MAX_BLOCK_SIZE = 64, 256, 128  # keep a task's arrays (on its thread's stack) small
_I64, _F32, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why, in one line."""


@dataclass
class CpuDecodes:
    """The step's decodes that the kernel attends: decode k is q's row rows[k], sequence seqs[k] of the step's
    block tables and lengths."""

    rows: torch.Tensor  # [n] int64
    seqs: torch.Tensor  # [n] int64
    block_tables: torch.Tensor  # [S, width] int64, the step's
    seq_lens: torch.Tensor  # [S] int64, the step's

    @property
    def count(self) -> int:
        return self.rows.shape[0]


def supports(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int) -> str | None:
    """None when the kernel can attend this model's shapes, else why not."""
    if dtype != torch.float32:
        return f"it computes in float32 only, the model runs in {dtype}"
    if heads // kv_heads > MAX_GROUP or head_dim > MAX_HEAD_DIM or block_size > MAX_BLOCK_SIZE:
        return (f"shapes past its bounds (query heads per KV head {heads // kv_heads} <= {MAX_GROUP}, head size "
                f"{head_dim} <= {MAX_HEAD_DIM}, block size {block_size} <= {MAX_BLOCK_SIZE})")
    return None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decodes: CpuDecodes,
                           scale: float, out: torch.Tensor) -> None:
    """out[rows] = attention of q[rows] over their sequences' cached context. q and out are [T, heads, dim] with
    unit stride along dim; the caches are contiguous [blocks, block_size, kv_heads, dim]."""
    if q.stride(2) != 1:
        q = q.contiguous()
    if out.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_decode_attention: out needs a unit stride along dim, the caches contiguity")
    _, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    tables, lens = decodes.block_tables, decodes.seq_lens
    kernel().paged_decode_f32(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        tables.data_ptr(), tables.stride(0), lens.data_ptr(),
        decodes.rows.data_ptr(), decodes.seqs.data_ptr(), decodes.count,
        heads, kv_heads, head_dim, block_size, scale, out.data_ptr(), out.stride(0), out.stride(1),
    )


@cache
def kernel() -> ctypes.CDLL:
    """The loaded kernel library; raises KernelUnavailable. Importing torch first matters: its libgomp.so.1 is
    the one the library then binds to."""
    library = ctypes.CDLL(str(_build()))
    function = library.paged_decode_f32
    function.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64,
                         _I64, _I64, _I64, _I64, _F32, _PTR, _I64, _I64]
    function.restype = None
    return library


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelUnavailable("no C compiler (cc or gcc) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *COMPILE_FLAGS)).encode() + _cpu_signature()).hexdigest()[:16]
    directory = _cache_dir()
    target = directory / f"paged_decode_cpu-{key}.so"
    with open(directory / f"paged_decode_cpu-{key}.lock", "w") as lock:  # processes starting together build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            result = subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(partial), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                partial.unlink(missing_ok=True)
                first = next((line for line in result.stderr.splitlines() if line.strip()), "no message")
                raise KernelUnavailable(f"{compiler} failed: {first}")
            partial.rename(target)
    return target


def _cache_dir() -> Path:
    """The first of PREDICTOR_KERNEL_CACHE, ~/.cache/llm-predictor/kernels and the temporary directory that can
    be written."""
    candidates = [os.environ.get("PREDICTOR_KERNEL_CACHE"), Path.home() / ".cache" / "llm-predictor" / "kernels",
                  Path(tempfile.gettempdir()) / "llm-predictor-kernels"]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    raise KernelUnavailable("no writable directory to build it in (set PREDICTOR_KERNEL_CACHE)")


def _cpu_signature() -> bytes:
    """-march=native builds for this CPU: a cache shared across machines must not hand one CPU another's build."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine.encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)})).encode()
