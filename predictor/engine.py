"""The batching engine: a scheduler thread running prefill/decode steps, and an async front for requests.

submit() validates and queues a request and returns a GenerationStream: an async iterator of Delta events
ending with one Finished event. The scheduler thread owns the model; the event loop only moves events.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from predictor.detokenizer import IncrementalDetokenizer, StopMatcher
from predictor.sampling import SamplingParams, SequenceSampler, TokenLogprob, sample_batch, token_logprobs

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]
IDLE_HEARTBEAT_S = 1.0


class EngineError(Exception):
    """Base of the errors submit() raises; each maps to an HTTP status."""

    status = 500


class InvalidRequest(EngineError):
    status = 400

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class EngineOverloaded(EngineError):
    status = 429


class EngineUnavailable(EngineError):
    status = 503


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


@dataclass(eq=False)
class _Sequence:
    """Scheduler-side state of one request."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    sampler: SequenceSampler
    stream: GenerationStream
    generated: list[int] = field(default_factory=list)

    @property
    def next_position(self) -> int:
        return len(self.prompt_ids) + len(self.generated) - 1


class Engine:
    def __init__(
        self,
        runner,
        tokenizer,
        *,
        num_slots: int,
        max_model_len: int,
        max_queue: int,
        max_prefill_tokens: int,
        eos_token_ids: set[int],
        on_fatal: Callable[[BaseException], None] = lambda err: None,
        on_finished: Callable[[GenerationStream, Finished], None] = lambda stream, event: None,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = eos_token_ids
        self.on_fatal = on_fatal
        self.on_finished = on_finished
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # index == KV cache slot
        self._pending = 0  # submitted, not yet admitted (read from the event loop)
        self._embeds: set[asyncio.Future] = set()  # embedding jobs not yet answered (event-loop side)
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._draining = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def stats(self) -> dict[str, float]:
        running, waiting = list(self._running), self._pending
        used = sum(len(s.prompt_ids) + len(s.generated) for s in running)
        return {
            "running": len(running),
            "waiting": waiting,
            "kv_cache_usage": used / (self.num_slots * self.max_model_len),
        }

    def begin_drain(self) -> None:
        """Refuse new work (503); what is queued or running goes on to the end."""
        self._draining = True

    async def drained(self, poll_s: float = 0.05) -> None:
        while self._pending or self._running or self._embeds:
            await asyncio.sleep(poll_s)

    def _check_admitting(self) -> None:
        if not self.alive:
            raise EngineUnavailable(f"engine is not running: {self.error or 'stopped'}")
        if self._draining:
            raise EngineUnavailable("server is shutting down")

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        self._check_admitting()
        if not prompt_ids:
            raise InvalidRequest("prompt", "must not be empty")
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise InvalidRequest(
                "max_new_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"must be <= max_model_len ({self.max_model_len})",
            )
        if self._pending >= self.max_queue:
            raise EngineOverloaded(f"queue is full: {self._pending} requests waiting (max_queue={self.max_queue})")
        self._loop = self._loop or asyncio.get_running_loop()
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        stream = GenerationStream(self, next(self._ids), params, self.tokenizer, prompt_ids)
        sampler = SequenceSampler(params, prompt_ids, stop_ids, self.runner.device)
        self._pending += 1
        self._inbox.put(("add", _Sequence(stream.id, list(prompt_ids), params, sampler, stream)))
        return stream

    def embed(self, prompt_ids: list[int]) -> asyncio.Future[list[float]]:
        """The prompt's mean-pooled, L2-normalised last hidden state, computed between batch steps."""
        self._check_admitting()
        if not prompt_ids:
            raise InvalidRequest("input", "must not be empty")
        if len(prompt_ids) > self.max_model_len:
            raise InvalidRequest("input", f"{len(prompt_ids)} tokens exceed max_model_len ({self.max_model_len})")
        self._loop = self._loop or asyncio.get_running_loop()
        future = self._loop.create_future()
        self._embeds.add(future)
        self._inbox.put(("embed", (list(prompt_ids), future)))
        return future

    def abort(self, request_id: int) -> None:
        self._inbox.put(("abort", request_id))

    def _deliver(self, events: list[tuple]) -> None:
        for stream, *event in events:
            stream._receive(*event)

    def _admitted(self, count: int) -> None:
        self._pending -= count

    # ---- scheduler thread --------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._drain_inbox(block=not (self._waiting or self._running)):
                    self.runner.heartbeat()
                    continue
                events: list = []
                self._admit(events)
                if self._running:
                    self._decode(events)
                self._emit(events)
        except BaseException as err:  # noqa: BLE001 - any failure ends every request and the engine
            logger.exception("engine failed")
            self.error = err
            self._fail_all(err)
            self.on_fatal(err)

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts; False if a blocking wait timed out with nothing to do."""
        try:
            item = self._inbox.get(timeout=IDLE_HEARTBEAT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return not block
        events: list = []
        while item is not None:
            kind, payload = item
            if kind == "add":
                self._waiting.append(payload)
            elif kind == "embed":
                self._run_embedding(*payload)
            else:
                self._cancel(payload, events)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None
        self._emit(events)
        return True

    def _cancel(self, request_id: int, events: list) -> None:
        for seq in self._waiting:
            if seq.id == request_id:
                self._waiting.remove(seq)
                self._call_loop(self._admitted, 1)
                events.append((seq.stream, [], 0, "cancelled", None, None))
                return
        for slot, seq in enumerate(self._running):
            if seq.id == request_id:
                self._release(slot)
                events.append((seq.stream, [], len(seq.generated), "cancelled", None, None))
                return

    def _run_embedding(self, prompt_ids: list[int], future: asyncio.Future) -> None:
        vector = self.runner.embed(prompt_ids)
        self._call_loop(self._answer_embedding, future, vector.tolist())

    def _answer_embedding(self, future: asyncio.Future, vector: list[float]) -> None:
        self._embeds.discard(future)
        if not future.done():
            future.set_result(vector)

    def _fail_embeddings(self, message: str) -> None:
        for future in self._embeds:
            if not future.done():
                future.set_exception(EngineUnavailable(f"engine failed: {message}"))
        self._embeds.clear()

    def _admit(self, events: list) -> None:
        budget, admitted = self.max_prefill_tokens, 0
        while self._waiting and len(self._running) < self.num_slots:
            seq = self._waiting[0]
            if admitted and len(seq.prompt_ids) > budget:
                break
            self._waiting.popleft()
            admitted += 1
            budget -= len(seq.prompt_ids)
            slot = len(self._running)
            self._running.append(seq)
            logits = self.runner.prefill(slot, seq.prompt_ids)[None]
            tokens = sample_batch(logits, [seq.sampler], [0])
            self._append_token(slot, tokens[0], _logprobs_of(logits, [seq], tokens)[0], events)
        if admitted:
            self._call_loop(self._admitted, admitted)

    def _decode(self, events: list) -> None:
        running = self._running
        logits = self.runner.decode([s.generated[-1] for s in running], [s.next_position for s in running])
        tokens = sample_batch(logits, [s.sampler for s in running], [len(s.generated) for s in running])
        logprobs = _logprobs_of(logits, running, tokens)
        # Walk backwards: releasing slot i moves the last sequence into it.
        for slot in reversed(range(len(running))):
            self._append_token(slot, tokens[slot], logprobs[slot], events)

    def _append_token(self, slot: int, token: int, logprob: TokenLogprob | None, events: list) -> None:
        seq = self._running[slot]
        seq.generated.append(token)
        reason: FinishReason | None = None
        if token in seq.sampler.stop_ids:
            reason = "stop"
        elif len(seq.generated) >= seq.params.max_new_tokens or seq.next_position + 1 >= self.max_model_len:
            reason = "length"
        shown = [] if reason == "stop" else [token]
        events.append((seq.stream, shown, len(seq.generated), reason, None, [logprob] if shown and logprob else None))
        if reason:
            self._release(slot)

    def _release(self, slot: int) -> None:
        last = len(self._running) - 1
        if slot != last:
            moved = self._running[last]
            self.runner.move(last, slot, moved.next_position)
            self._running[slot] = moved
        self._running.pop()

    def _emit(self, events: list) -> None:
        if events:
            self._call_loop(self._deliver, events)

    def _call_loop(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _fail_all(self, err: BaseException) -> None:
        failed = [(s.stream, [], len(s.generated), "error", str(err), None) for s in (*self._waiting, *self._running)]
        self._waiting.clear()
        self._running.clear()
        self._emit(failed)
        self._call_loop(self._fail_embeddings, str(err))


def _logprobs_of(logits: torch.Tensor, seqs: list[_Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    result: list[TokenLogprob | None] = [None] * len(seqs)
    if rows:
        for row, logprob in zip(rows, token_logprobs(logits, rows, tokens, [seqs[r].params.logprobs for r in rows])):
            result[row] = logprob
    return result


class GenerationStream:
    """Async iterator over one request's Delta events and its final Finished event."""

    def __init__(self, engine: Engine, request_id: int, params: SamplingParams, tokenizer, prompt_ids: list[int]):
        self.engine = engine
        self.id = request_id
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.token_gaps: list[float] = []  # seconds between consecutive token deliveries
        self._min_new_tokens = params.min_new_tokens
        self._events: asyncio.Queue[Delta | Finished] = asyncio.Queue()
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(params.stop)
        self._finished = False  # no more events will be queued
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
        """Stop generating (client gone): the scheduler frees the KV slot and queues Finished('cancelled')."""
        if not self._finished:
            self.engine.abort(self.id)

    def _receive(
        self, tokens: list[int], generated: int, reason: FinishReason | None, error: str | None,
        logprobs: list[TokenLogprob] | None,
    ) -> None:
        if self._finished:
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
                self.engine.abort(self.id)
            reason = "stop"
        elif reason:
            released += self._stops.flush()
        if released or tokens:
            self._events.put_nowait(Delta(released, tokens, logprobs, pieces if logprobs else None))
        if reason:
            self._finished = True
            finished = Finished(reason, self.prompt_tokens, generated, error)
            self._events.put_nowait(finished)
            self.engine.on_finished(self, finished)

    def _note_arrival(self, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            self.token_gaps.append(now - self.last_token_at)
        self.last_token_at = now
