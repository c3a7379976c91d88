"""Tensor parallelism: launching ranks, and rank 0 leading the others step by step.

Every rank loads its shard and owns a ModelRunner. Rank 0 schedules; before each runner call it broadcasts
the call on a CPU (gloo) control group, and the other ranks replay it, so all ranks enter the model's
collectives together. When idle, rank 0 broadcasts a heartbeat so that a dead rank is noticed at once.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(seconds=60)
MODEL_TIMEOUT = timedelta(hours=1)  # loading large shards is slow and uneven across ranks


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int

    @property
    def leads(self) -> bool:
        return self.rank == 0


def rank_from_env() -> Rank | None:
    """The torchrun env contract: RANK, WORLD_SIZE, LOCAL_RANK."""
    if "WORLD_SIZE" not in os.environ:
        return None
    return Rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def launch_local_ranks(nproc: int, argv: list[str]) -> int:
    """Re-run this command as `nproc` ranks under torchrun's agent, which stops all ranks if one fails."""
    from torch.distributed.run import main as torchrun

    args = ["--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0", "--module", "predictor", *argv]
    logger.info("starting %d tensor-parallel ranks", nproc)
    try:
        torchrun(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:  # torchrun raises ChildFailedError when a rank fails
        print(f"llm-predictor: a tensor-parallel rank failed: {err}", file=sys.stderr)
        return 1
    return 0


def init_process_groups(device: torch.device) -> dist.ProcessGroup:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=MODEL_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


class LeaderRunner:
    """Rank 0's runner: announces each call to the other ranks, then makes it locally."""

    def __init__(self, runner, control: dist.ProcessGroup):
        self.runner = runner
        self.control = control
        self.device = runner.device

    def _announce(self, *call) -> None:
        dist.broadcast_object_list([call], src=0, group=self.control)

    def prefill(self, slot, token_ids):
        self._announce("prefill", slot, token_ids)
        return self.runner.prefill(slot, token_ids)

    def decode(self, token_ids, positions):
        self._announce("decode", token_ids, positions)
        return self.runner.decode(token_ids, positions)

    def embed(self, token_ids):
        self._announce("embed", token_ids)
        return self.runner.embed(token_ids)

    def move(self, src, dst, length):
        self._announce("move", src, dst, length)
        self.runner.move(src, dst, length)

    def heartbeat(self):
        self._announce("heartbeat")

    def stop(self):
        self._announce("stop")


def follow(runner, control: dist.ProcessGroup) -> None:
    """Ranks > 0: replay rank 0's calls until it says stop (or a collective fails, which raises)."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        name, *args = box[0]
        if name == "stop":
            return
        if name != "heartbeat":
            getattr(runner, name)(*args)
