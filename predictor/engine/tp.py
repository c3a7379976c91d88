"""Tensor parallelism: rank 0 leading the others step by step (predictor/engine/launcher.py starts them on one
node).

Every rank loads its shard and owns a ModelRunner (with the same KV cache size and the same CUDA graphs).
Rank 0 schedules; before each runner call it broadcasts the call as int64 tensors (an op and size header,
then the step's packed ModelInputs) on a CPU (gloo) control group, and the other ranks replay it, so all ranks
enter the model's collectives together. When idle, rank 0 broadcasts a heartbeat so that a dead rank is
noticed at once.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from predictor.engine.model_inputs import ModelInputs

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


def init_process_groups(device: torch.device) -> dist.ProcessGroup:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=MODEL_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def close_process_groups() -> None:
    """Destroy the groups before the interpreter exits: a gloo group left to static destruction can abort the
    process ("terminate called without an active exception") and turn a clean shutdown into exit code -6."""
    if dist.is_initialized():
        dist.destroy_process_group()


class Op(enum.IntEnum):
    STEP = 1
    EMBED = 2
    HEARTBEAT = 3
    STOP = 4


class LeaderRunner:
    """Rank 0's runner: announces each call to the other ranks as int64 tensors, then makes it locally."""

    def __init__(self, runner, control: dist.ProcessGroup):
        self.runner = runner
        self.control = control
        self.device = runner.device
        self.vocab_size = runner.vocab_size

    def _announce(self, op: Op, payload: torch.Tensor | None = None) -> None:
        size = 0 if payload is None else payload.numel()
        dist.broadcast(torch.tensor([op, size], dtype=torch.int64), src=0, group=self.control)
        if payload is not None:
            dist.broadcast(payload, src=0, group=self.control)

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        self._announce(Op.STEP, inputs.pack())
        return self.runner.execute(inputs)

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        self._announce(Op.EMBED, torch.tensor(token_ids, dtype=torch.int64))
        return self.runner.embed(token_ids)

    def check_device(self) -> None:
        self.runner.check_device()

    def heartbeat(self) -> None:
        self._announce(Op.HEARTBEAT)

    def stop(self) -> None:
        self._announce(Op.STOP)


def follow(runner, control: dist.ProcessGroup) -> None:
    """Ranks > 0: replay rank 0's calls until it says stop (or a collective fails, which raises)."""
    while True:
        header = torch.zeros(2, dtype=torch.int64)
        dist.broadcast(header, src=0, group=control)
        op, size = header.tolist()
        if op == Op.STOP:
            return
        if op == Op.HEARTBEAT:
            continue
        payload = torch.empty(size, dtype=torch.int64)
        dist.broadcast(payload, src=0, group=control)
        if op == Op.STEP:
            runner.execute(ModelInputs.unpack(payload))
        elif op == Op.EMBED:
            runner.embed(payload.tolist())
