"""Tensor parallelism: rank 0 leading the others step by step (predictor/engine/launcher.py starts them on one
node).

Every rank loads its shard and owns a ModelRunner (with the same KV cache size and the same CUDA graphs).
Rank 0 schedules; before each runner call it broadcasts the call as int64 tensors (an op and size header,
then the step's packed ModelInputs) on a CPU (gloo) control group, and the other ranks replay it, so all ranks
enter the model's collectives together. When idle, rank 0 broadcasts a heartbeat on the control group, so that
the others' waits for the next call never time out.

A rank that stops answering (hung, stopped, dead) would only be noticed when a collective times out, and during
a step rank 0 waits inside the model's own collective: so every rank also runs Liveness, a thread of its own
that exchanges a tiny all_reduce each second on a gloo group of its own with a short timeout. When it fails,
rank 0's engine fails (readiness turns 503, then the process exits) and the other ranks exit.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from predictor.engine.model_inputs import ModelInputs

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(seconds=60)
LIVENESS_PERIOD_S = 1.0
LIVENESS_TIMEOUT = timedelta(seconds=5)  # a rank silent this long is taken for lost
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


def init_process_groups(device: torch.device) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The model's group, then (made by every rank in the same order) the control group and the liveness
    group, both gloo on the CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=MODEL_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return control, dist.new_group(backend="gloo", timeout=LIVENESS_TIMEOUT)


def close_process_groups() -> None:
    """Destroy the groups before the interpreter exits: a gloo group left to static destruction can abort the
    process ("terminate called without an active exception") and turn a clean shutdown into exit code -6."""
    if dist.is_initialized():
        dist.destroy_process_group()


def agreement(control: dist.ProcessGroup) -> Callable[[bool], bool]:
    """agree(ok): True on every rank if ok is True on every rank, else False on all; a collective over the control
    group, so every rank calls it at the same point of start-up (FastPath's stages)."""

    def agree(ok: bool) -> bool:
        flag = torch.tensor([int(ok)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=control)
        return bool(flag.item())

    return agree


class RankLost(RuntimeError):
    """A tensor-parallel rank stopped answering the liveness heartbeat."""


class Liveness:
    """Every rank's heartbeat: a one-element all_reduce each second on its own group, from its own thread, so it
    goes on while the ranks' main threads wait in a step. A round that times out (a rank stopped answering)
    calls on_lost once and ends the heartbeat. Each round also carries whether a rank is stopping, so that every
    rank ends on the same round and a clean shutdown is never taken for a lost rank."""

    def __init__(self, group: dist.ProcessGroup, on_lost: Callable[[RankLost], None]):
        self.group = group
        self.on_lost = on_lost  # may be replaced once there is more to fail (rank 0's engine)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the heartbeat on every rank (the others' stop in the same round) and wait for it."""
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        flag = torch.zeros(1, dtype=torch.int64)
        while True:
            flag.fill_(int(self._stopping.is_set()))
            try:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            except Exception as err:  # noqa: BLE001 - gloo's timeout or a closed connection: a rank is gone
                self.on_lost(RankLost(f"a tensor-parallel rank did not answer the heartbeat within "
                                      f"{LIVENESS_TIMEOUT.total_seconds():g}s ({' '.join(str(err).split())})"))
                return
            if flag.item():
                return
            self._stopping.wait(LIVENESS_PERIOD_S)


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

    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        self._announce(Op.EMBED, pack_prompts(prompts))
        return self.runner.embed(prompts)

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
            runner.embed(unpack_prompts(payload))


def pack_prompts(prompts: list[list[int]]) -> torch.Tensor:
    """[count, length of each, then every prompt's ids] as one int64 tensor."""
    return torch.tensor([len(prompts), *map(len, prompts), *(t for p in prompts for t in p)], dtype=torch.int64)


def unpack_prompts(packed: torch.Tensor) -> list[list[int]]:
    values = packed.tolist()
    count = values[0]
    prompts, offset = [], 1 + count
    for length in values[1 : 1 + count]:
        prompts.append(values[offset : offset + length])
        offset += length
    return prompts
