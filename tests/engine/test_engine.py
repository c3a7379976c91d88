"""The Engine's admission and embedding jobs over a fake runner whose embedding forward waits for the test: what
runs between two steps, what a client leaving drops, and one max_queue for generations and embedding inputs."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest
import torch

from predictor.engine import Engine, EngineOverloaded, Finished, InvalidRequest, SamplingParams
from predictor.engine.core_client import ThreadCore

from .test_core import FakeRunner, core

HIDDEN = 4
GATE_TIMEOUT_S = 30


class GatedRunner(FakeRunner):
    """Each embedding forward records its prompts and waits until the test opens the gate once for it."""

    def __init__(self):
        super().__init__()
        self.embedded: list[list[list[int]]] = []
        self._gate = threading.Semaphore(0)

    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        self.embedded.append(prompts)
        assert self._gate.acquire(timeout=GATE_TIMEOUT_S), "the test never let the embedding forward finish"
        return torch.nn.functional.normalize(torch.ones(len(prompts), HIDDEN), dim=1)

    def release(self, forwards: int = 1) -> None:
        self._gate.release(forwards)

    def heartbeat(self) -> None:
        pass


class Letters:
    """Enough of a tokenizer for the streams' detokenizer."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def engine_over(runner: GatedRunner, max_queue: int = 64, max_prefill_tokens: int = 16) -> tuple[Engine, Counter]:
    outcomes: Counter = Counter()
    engine = Engine(ThreadCore(core(num_blocks=100, runner=runner, max_prefill_tokens=max_prefill_tokens)), Letters(),
                    max_model_len=64, max_queue=max_queue, eos_token_ids={0},
                    on_embeddings=lambda outcome, count: outcomes.update({outcome: count}))
    engine.start()
    return engine, outcomes


async def until(condition, timeout: float = GATE_TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


PROMPT = [3] * 8  # two per embedding forward under a 16-token budget
ONE_TOKEN = SamplingParams(temperature=0, max_new_tokens=1)


def test_a_generation_waits_for_one_embedding_forward_and_a_left_job_is_dropped():
    runner = GatedRunner()
    engine, outcomes = engine_over(runner)

    async def scenario():
        left = engine.embed([PROMPT] * 4)
        kept = engine.embed([PROMPT] * 4)
        await until(lambda: len(runner.embedded) == 1)  # the first forward (left's first two) is running
        stream = engine.submit([5, 6], ONE_TOKEN)
        left.cancel()  # its client went away
        await asyncio.sleep(0.05)  # the engine would have taken more if it could
        runner.release()
        await until(lambda: len(runner.embedded) == 2)
        assert runner.embedded[1] == [PROMPT, PROMPT]  # kept's first two: left's other two were dropped
        runner.release()
        events = [event async for event in stream]
        assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 1
        assert outcomes["computed"] == 4 and not kept.done()  # before kept's last forward was let go
        runner.release()
        vectors = await kept
        assert len(vectors) == 4 and all(len(v) == HIDDEN for v in vectors)
        await until(lambda: outcomes["computed"] == 6)
        assert outcomes == {"computed": 6, "cancelled": 2}
        assert engine.stats["waiting"] == 0

    try:
        asyncio.run(scenario())
    finally:
        runner.release(100)
        engine.stop()


def test_embedding_inputs_and_generations_share_max_queue_all_or_none():
    runner = GatedRunner()
    engine, _ = engine_over(runner, max_queue=4)

    async def scenario():
        embedding = engine.embed([PROMPT] * 3)
        await until(lambda: len(runner.embedded) == 1)  # two of them computing: all three still count
        with pytest.raises(EngineOverloaded, match="max_queue=4"):
            engine.submit_all([([5], ONE_TOKEN)] * 2, "instances")
        with pytest.raises(InvalidRequest, match="^instances: 5 items exceed max_queue \\(4\\)"):
            engine.submit_all([([5], ONE_TOKEN)] * 5, "instances")
        with pytest.raises(InvalidRequest, match="^input: 5 items exceed max_queue"):
            engine.embed([PROMPT] * 5)
        stream = engine.submit([5], ONE_TOKEN)  # the last free place
        with pytest.raises(EngineOverloaded):
            engine.embed([PROMPT])
        assert engine.stats["waiting"] == 4
        runner.release(2)
        assert len(await embedding) == 3
        assert isinstance([event async for event in stream][-1], Finished)
        assert engine.stats["waiting"] == 0
        assert len(engine.submit_all([([5], ONE_TOKEN)] * 4, "instances")) == 4  # all of them fit again

    try:
        asyncio.run(scenario())
    finally:
        runner.release(100)
        engine.stop()
