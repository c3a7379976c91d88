"""Start the real predictor as a subprocess on a loopback port, wait for it to be ready, read its metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def predictor_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREDICTOR_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2", **extra)
    return env


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    model_name: str
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def launch(model_dir: Path, log: Path, *args: str, model_name: str = "tiny", env: dict | None = None) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "predictor", f"--model_dir={model_dir}", f"--model_name={model_name}",
               f"--http_port={port}", f"--grpc_port={free_port()}", *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env or predictor_env(), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Server(process, f"http://127.0.0.1:{port}", model_name, log)


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"predictor exited with {server.process.returncode}:\n{server.output()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/v1/models/{server.model_name}", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"predictor not ready after {timeout}s:\n{server.output()[-3000:]}")


def start(model_dir: Path, log: Path, *args: str, **kwargs) -> Server:
    return wait_ready(launch(model_dir, log, *args, **kwargs))


def metric(server, name: str, absent: float | None = None) -> float:
    """One sample of /metrics by its full name (labels included); `absent` for a labelled series not yet made."""
    return metrics(server, name, absent=absent)[0]


def metrics(server, *names: str, absent: float | None = None) -> list[float]:
    """Samples of one /metrics scrape (so they agree with each other), as metric() reads one."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = []
    for name in names:
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert found or absent is not None, f"{name} is not in /metrics"
        values.append(float(found.group(1)) if found else absent)
    return values


def wait_for_metric(server, name: str, value: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def wait_for_metrics(server, condition, *names: str, timeout: float = 60) -> list[float]:
    """The named samples (of one scrape) once condition(*samples) holds; a labelled series not yet made is 0."""
    deadline = time.monotonic() + timeout
    while not condition(*(values := metrics(server, *names, absent=0))):
        assert time.monotonic() < deadline, f"{names} never got there: {values}"
        time.sleep(0.02)
    return values


def held_request(server, path: str, body: dict) -> socket.socket:
    """A request sent on a socket of its own; its client leaves when the caller closes the socket."""
    payload = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def listening_addresses(pids) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the processes listen on."""
    return {(c.laddr.ip, c.laddr.port) for pid in pids for c in psutil.Process(pid).connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def outside_address() -> str | None:
    """An address of this machine's other than loopback, or None if it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # a documentation address: picks the outgoing interface, sends nothing
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address
