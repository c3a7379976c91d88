"""A local predictor launched for the benchmark: start it, wait until it is ready, read its peak RSS, stop it."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30


@dataclass
class LocalServer:
    process: subprocess.Popen
    url: str
    log: Path

    def peak_rss_bytes(self) -> int | None:
        """VmHWM, the most resident memory each process has had so far, summed over the server and its children
        (our engine core's process, vLLM's)."""
        try:
            pids = [self.process.pid, *(child.pid for child in psutil.Process(self.process.pid).children(True))]
        except psutil.Error:
            return None
        peaks = [_peak_rss(pid) for pid in pids]
        return sum(peak for peak in peaks if peak) if peaks[0] is not None else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its whole process group: a server's helper processes (vLLM's engine core and
        workers, tensor-parallel ranks) must not outlive it and hold the cores the next measurement needs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    """The caller's environment (thread settings included, so the server computes like the raw loop did),
    without PREDICTOR_* settings that would change what is measured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREDICTOR_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def spawn(command: list[str], log: Path, port: int, env: dict[str, str]) -> LocalServer:
    """Any HTTP server on a loopback port, in its own session (so stop() reaches its children), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return LocalServer(process, f"http://127.0.0.1:{port}", log)


def launch(log: Path, model_dir: Path | None, model_name: str, server_args: list[str],
           extra_env: dict[str, str] | None = None) -> LocalServer:
    """`python -m predictor` on a loopback port; no model_dir serves the demo model."""
    port = free_port()
    command = [sys.executable, "-m", "predictor", f"--http_port={port}", f"--grpc_port={free_port()}",
               f"--model_name={model_name}", *server_args]
    if model_dir is not None:
        command.append(f"--model_dir={model_dir}")
    return spawn(command, log, port, {**server_env(), **(extra_env or {})})


def wait_ready(server: LocalServer, ready_path: str, timeout_s: float = READY_TIMEOUT_S,
               name: str = "the predictor") -> None:
    """Until GET `ready_path` answers 200; stopped again if the server exits or never does."""
    deadline = time.monotonic() + timeout_s
    logger.info("waiting for %s (pid %d) at %s", name, server.process.pid, server.url)
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                tail = server.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {server.process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{server.url}{ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} was not ready after {timeout_s:.0f}s; see {server.log}")
    except BaseException:
        server.stop()
        raise


def start(log: Path, model_dir: Path | None, model_name: str, server_args: list[str],
          extra_env: dict[str, str] | None = None) -> LocalServer:
    """launch, then wait until it serves the model."""
    local = launch(log, model_dir, model_name, server_args, extra_env)
    wait_ready(local, f"/v1/models/{model_name}")
    return local


def _peak_rss(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None
