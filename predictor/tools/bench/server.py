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

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30


@dataclass
class LocalServer:
    process: subprocess.Popen
    url: str
    log: Path

    def peak_rss_bytes(self) -> int | None:
        """VmHWM: the most resident memory the process has had so far."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
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


def launch(log: Path, model_dir: Path | None, model_name: str, server_args: list[str]) -> LocalServer:
    """`python -m predictor` on a loopback port; no model_dir serves the demo model."""
    port = free_port()
    command = [sys.executable, "-m", "predictor", f"--http_port={port}", f"--grpc_port={free_port()}",
               f"--model_name={model_name}", *server_args]
    if model_dir is not None:
        command.append(f"--model_dir={model_dir}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return LocalServer(process, f"http://127.0.0.1:{port}", log)


def wait_ready(server: LocalServer, model_name: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the predictor exited with {server.process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{server.url}/v1/models/{model_name}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"the predictor was not ready after {timeout_s:.0f}s; see {server.log}")


def start(log: Path, model_dir: Path | None, model_name: str, server_args: list[str]) -> LocalServer:
    """launch, then wait until it serves the model; stopped again if it never does."""
    local = launch(log, model_dir, model_name, server_args)
    logger.info("waiting for the local server (pid %d) at %s", local.process.pid, local.url)
    try:
        wait_ready(local, model_name)
    except BaseException:
        local.stop()
        raise
    return local
