"""One request's events, as its caller iterates them: text deltas (detokenized, stop strings applied), then
one Finished event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from predictor.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from predictor.engine.sampling_params import SamplingParams, TokenLogprob

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for logprobs
    token_texts: list[str] | None = None  # each token's share of `text`, with logprobs


@dataclass
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


class GenerationStream:
    """Async iterator over one request's Delta events and its final Finished event.

    Events are fed on the event loop by the Engine (`receive`); `cancel` (or leaving the iteration) asks the
    engine to stop generating, which frees the request's KV cache blocks.
    """

    def __init__(self, request_id: int, params: SamplingParams, tokenizer, prompt_ids: list[int],
                 abort: Callable[[int], None], on_finished: Callable[[GenerationStream, Finished], None]):
        self.id = request_id
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens: int | None = None  # prompt tokens found in the prefix cache; None until admitted
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.token_gaps: list[float] = []  # seconds between consecutive token deliveries
        self._abort = abort
        self._on_finished = on_finished
        self._min_new_tokens = params.min_new_tokens
        self._events: asyncio.Queue[Delta | Finished] = asyncio.Queue()
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(params.stop)
        self.finished = False  # no more events will be queued
        self._drained = False  # the consumer has seen Finished

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta | Finished:
        if self._drained:
            raise StopAsyncIteration
        try:
            event = await self._events.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        self._drained = isinstance(event, Finished)
        return event

    def cancel(self) -> None:
        """Stop generating (client gone): the engine frees the KV blocks and queues Finished('cancelled')."""
        if not self.finished:
            self._abort(self.id)

    def receive(self, tokens: list[int], generated: int, reason: FinishReason | None, error: str | None,
                logprobs: list[TokenLogprob] | None) -> None:
        if self.finished:
            return
        self.completion_tokens = generated
        if tokens:
            self._note_arrival(time.monotonic())
        pieces = [self._detokenizer.push(t) for t in tokens]
        if reason:
            tail = self._detokenizer.flush()
            if pieces:
                pieces[-1] += tail
            elif tail:
                pieces = [tail]
        text = "".join(pieces)
        released = self._stops.feed(text, check=generated > self._min_new_tokens)
        if self._stops.stopped:
            if not reason:
                self._abort(self.id)
            reason = "stop"
        elif reason:
            released += self._stops.flush()
        if released or tokens:
            self._events.put_nowait(Delta(released, tokens, logprobs, pieces if logprobs else None))
        if reason:
            self.finish(reason, error)

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        """The last event: nothing is queued after it."""
        if self.finished:
            return
        self.finished = True
        finished = Finished(reason, self.prompt_tokens, self.completion_tokens, error, self.cached_tokens or 0)
        self._events.put_nowait(finished)
        self._on_finished(self, finished)

    def _note_arrival(self, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            self.token_gaps.append(now - self.last_token_at)
        self.last_token_at = now
