"""One request's state as the engine core sees it: its tokens, what of them the KV cache holds, and where."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from predictor.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted (its blocks freed; it is recomputed when admitted again)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    output_token_ids: list[int] = field(default_factory=list)
    # Async scheduling: tokens sampled on the device that the host does not know yet. They count in num_tokens, so
    # the scheduler computes the next one as a placeholder whose id the runner fills on the device.
    num_pending: int = 0
    num_computed: int = 0  # leading tokens whose keys and values are in the KV cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks so far (the block manager's)
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache held when it was first admitted
    status: SequenceStatus = SequenceStatus.WAITING
    sampler_row: int | None = None  # the sampler's per-row state (penalty counts) while running
    generator: Any = None  # a seeded request's own random generator, kept across preemptions
    grammar: Any = None  # the structured_output.Grammar its output must follow, if any
    matcher: Any = None  # the grammar's state while it holds a sampler row, rebuilt from the output on resuming
    first_scheduled_at: float | None = None  # monotonic time it was first admitted to the batch
    error: str | None = None  # why it failed, when it did

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens whose ids the host has: the pending ones are not."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, all of them known (end <= num_known_tokens)."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.output_token_ids[start - len(prompt) : end - len(prompt)]
        return prompt[start:] + self.output_token_ids[: end - len(prompt)]
