"""Embedding jobs waiting in the core loop, computed between steps in padded batches of bounded size.

A job is one request's prompts. Between two engine steps the engine takes one batch: prompts from the oldest
jobs first, as many as fit `budget` tokens counted padded (rows x the longest prompt), at least one. So a burst
of embeddings holds the running generations for at most one such forward per step, as a prefill chunk would.
A job whose client left is dropped before its next prompt is taken: only what had started is computed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class EmbeddingJob:
    id: int
    prompts: list[list[int]]
    vectors: list[list[float]] = field(default_factory=list)  # computed so far, in the prompts' order
    taken: int = 0  # prompts handed to the runner so far
    cancelled: bool = False  # its client left

    @property
    def complete(self) -> bool:
        return len(self.vectors) == len(self.prompts)


Batch = list[tuple[EmbeddingJob, list[int]]]


class EmbeddingQueue:
    def __init__(self, budget_tokens: int):
        self.budget_tokens = budget_tokens
        self._jobs: deque[EmbeddingJob] = deque()

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def add(self, job: EmbeddingJob) -> None:
        self._jobs.append(job)

    def clear(self) -> None:
        """Forget every job (the front answers their clients)."""
        self._jobs.clear()

    def drop_cancelled(self) -> int:
        """Forget the jobs whose clients left; how many of their prompts will never be computed."""
        dropped = 0
        for job in [j for j in self._jobs if j.cancelled]:
            self._jobs.remove(job)
            dropped += len(job.prompts) - job.taken
        return dropped

    def next_batch(self) -> Batch:
        batch: Batch = []
        longest = 0
        for job in self._jobs:
            while job.taken < len(job.prompts):
                prompt = job.prompts[job.taken]
                width = max(longest, len(prompt))
                if batch and width * (len(batch) + 1) > self.budget_tokens:
                    return batch
                batch.append((job, prompt))
                job.taken += 1
                longest = width
        return batch

    def finish(self, batch: Batch, vectors: list[list[float]]) -> list[EmbeddingJob]:
        """Hand each job its vectors; the jobs now complete, no longer queued."""
        for (job, _), vector in zip(batch, vectors, strict=True):
            job.vectors.append(vector)
        done = [job for job in dict.fromkeys(job for job, _ in batch) if job.complete]
        for job in done:
            self._jobs.remove(job)
        return done
