"""Single-node tensor parallelism: this command again as one process per rank, reachable from this machine only.

torchrun's agent (which the chart runs across nodes) listens for its rendezvous on every interface, and on
SIGTERM signals every rank at once, cutting short rank 0's drain. Here the ranks meet at a TCPStore this launcher
serves on 127.0.0.1, and gloo and NCCL bootstrap on the loopback interface; a SIGTERM or SIGINT goes to rank 0
alone, which drains and then stops the other ranks; and when one rank fails, the others are stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import torch.distributed as dist

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"
POLL_S = 0.2
FOLLOWERS_STOP_S = 60  # once rank 0 has exited 0, how long the others get to follow it (they stop on its word)


def launch_local_ranks(nproc: int, argv: list[str]) -> int:
    """Run `python -m predictor argv` as nproc ranks; the exit code is 0 when every rank exits 0."""
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, is_master=True, master_listen_fd=listener.detach(),  # the store's now
                          wait_for_workers=False)
    logger.info("starting %d tensor-parallel ranks (rendezvous on %s:%d)", nproc, LOOPBACK, port)
    ranks = [_start(rank, nproc, port, argv) for rank in range(nproc)]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: ranks[0].send_signal(signum))
    try:
        return _supervise(ranks)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.wait()
        del store


def _start(rank: int, nproc: int, port: int, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}  # every rank a client of the store served above
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.setdefault(name, LOOPBACK_INTERFACE)
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: the ranks would otherwise share out every core each
    return subprocess.Popen([sys.executable, "-u", "-m", "predictor", *argv], env=env)


def _supervise(ranks: list[subprocess.Popen]) -> int:
    followers_deadline = None
    while True:
        codes = [process.poll() for process in ranks]
        failed = next(((rank, code) for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None:
            rank, code = failed
            print(f"llm-predictor: tensor-parallel rank {rank} exited with {code}; stopping the others",
                  file=sys.stderr, flush=True)
            return code if code > 0 else 128 - code  # killed by a signal: the shell's 128 + its number
        if all(code == 0 for code in codes):
            return 0
        if codes[0] == 0:
            followers_deadline = followers_deadline or time.monotonic() + FOLLOWERS_STOP_S
            if time.monotonic() > followers_deadline:
                print("llm-predictor: tensor-parallel ranks outlived rank 0; stopping them", file=sys.stderr)
                return 1
        time.sleep(POLL_S)
