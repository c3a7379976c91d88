"""The engine's front: requests in from the event loop, the core's steps on a thread of their own, events back.

submit() validates and queues a request and returns a GenerationStream; submit_all() queues a request's
several generations together or none; embed() queues a request's prompts as one embedding job. Every queued
generation and embedding prompt counts against max_queue until it is admitted to the batch (or computed).
The engine thread drains the inbox (new requests, aborts, embedding jobs) between steps, computes one bounded
batch of embeddings between two steps (predictor/engine/embedding_queue.py), and hands each step's events to
the event loop in one call. Any exception out of a step (the device or a tensor-parallel rank failed) ends
every request and the engine; a failure that belongs to one request ends only that request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable

import torch

from predictor.engine.core import EngineCore, SequenceOutput
from predictor.engine.embedding_queue import EmbeddingJob, EmbeddingQueue
from predictor.engine.errors import SHUTTING_DOWN, EngineOverloaded, EngineUnavailable, InvalidRequest
from predictor.engine.sampling_params import SamplingParams
from predictor.engine.sequence import Sequence
from predictor.engine.stream import Finished, GenerationStream
from predictor.engine.structured_output import Grammar, Grammars

logger = logging.getLogger(__name__)

IDLE_HEARTBEAT_S = 1.0


class Engine:
    def __init__(
        self,
        core: EngineCore,
        tokenizer,
        *,
        max_model_len: int,
        max_queue: int,
        eos_token_ids: set[int],
        grammars: Grammars | None = None,
        on_fatal: Callable[[BaseException], None] = lambda err: None,
        on_finished: Callable[[GenerationStream, Finished], None] = lambda stream, event: None,
        on_embeddings: Callable[[str, int], None] = lambda outcome, count: None,
    ):
        self.core = core
        self.runner = core.runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.eos_token_ids = eos_token_ids
        self.grammars = grammars  # None: structured output is refused
        self.on_fatal = on_fatal
        self.on_finished = on_finished
        self.on_embeddings = on_embeddings  # (outcome "computed" or "cancelled", prompts), on the event loop
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # generations not yet admitted to the batch + embedding prompts not yet computed
        self._preempted = 0  # waiting again after a preemption (engine-thread side, read by stats)
        self._embedding_jobs: set[EmbeddingJob] = set()  # not yet answered (event-loop side)
        self._embeddings = EmbeddingQueue(core.scheduler.max_prefill_tokens)  # engine-thread side
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
        return {
            "running": len(self.core.scheduler.running),
            "waiting": self._pending + self._preempted,
            "kv_cache_usage": self.core.kv_cache_usage,
        }

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Refuse new work (503); what is queued or running goes on to the end."""
        self._draining = True

    def end_all(self) -> None:
        """End every queued and running request now, freeing its KV blocks: each stream finishes with
        finish_reason "error" and the error SHUTTING_DOWN (the shutdown's grace period is over)."""
        self._inbox.put(("end_all", None))

    async def drained(self, poll_s: float = 0.05) -> None:
        while self._pending or self.core.has_work or self._embedding_jobs:
            await asyncio.sleep(poll_s)

    def fail(self, err: BaseException) -> None:
        """Something outside the engine thread found the engine unusable (a tensor-parallel rank stopped
        answering while this thread may be waiting on it): readiness turns 503 and on_fatal runs."""
        if self.error is None:
            self.error = err
            self.on_fatal(err)

    def check_device(self) -> None:
        """Raises if the model's device cannot run a tiny operation."""
        self.runner.check_device()

    def _check_admitting(self) -> None:
        if not self.alive:
            raise EngineUnavailable("the engine has " + ("failed (see the server log)" if self.error else "stopped"))
        if self._draining:
            raise EngineUnavailable(SHUTTING_DOWN)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        return self.submit_all([(prompt_ids, params)], "prompt")[0]

    def submit_all(self, requests: list[tuple[list[int], SamplingParams]], field: str) -> list[GenerationStream]:
        """Queue one client request's generations (V1 instances, prompts, choices) all together, or none: the
        queue must hold them all now (else EngineOverloaded, a 429), and more than max_queue never fit (an
        InvalidRequest naming field). A big request thus never holds part of the queue while it waits for the
        rest, and small requests keep getting in."""
        self._check_admitting()
        for prompt_ids, params in requests:
            self._check_generation(prompt_ids, params)
        grammars = [self.grammar(params) for _, params in requests]
        self._reserve(len(requests), field)
        self._loop = self._loop or asyncio.get_running_loop()
        streams = []
        for (prompt_ids, params), grammar in zip(requests, grammars, strict=True):
            stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
            request_id = next(self._ids)
            stream = GenerationStream(request_id, params, self.tokenizer, prompt_ids, self.abort, self.on_finished)
            seq = Sequence(request_id, list(prompt_ids), params, stop_ids, stream, grammar=grammar)
            self._inbox.put(("add", seq))
            streams.append(stream)
        return streams

    def _check_generation(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt", "must not be empty")
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise InvalidRequest(
                "max_new_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"must be <= max_model_len ({self.max_model_len})",
            )
        vocab_size = self.runner.vocab_size
        beyond = next((i for i, t in enumerate(params.stop_token_ids) if t >= vocab_size), None)
        if beyond is not None:
            raise InvalidRequest(f"stop_token_ids.{beyond}", f"{params.stop_token_ids[beyond]} is not a token id of "
                                 f"this model: must be < {vocab_size}, the vocabulary size")

    def check_request_size(self, count: int, field: str) -> None:
        """A request of `count` generations or embedding inputs can ever be queued: call this before preparing
        them, so that one that never can is refused before any work (an InvalidRequest naming field)."""
        if count > self.max_queue:
            raise InvalidRequest(field, f"{count} items exceed max_queue ({self.max_queue}), the most one request "
                                        "can queue; split the request")

    def _reserve(self, count: int, field: str) -> None:
        """Count `count` items of one request against max_queue, all or none."""
        self.check_request_size(count, field)
        if self._pending + count > self.max_queue:
            raise EngineOverloaded(f"queue is full: {self._pending} waiting, {count} more asked "
                                   f"(max_queue={self.max_queue})")
        self._pending += count

    def check_grammar(self, params: SamplingParams, field: str = "structured_output") -> None:
        """What can be said of params.structured_output without compiling it (quick): available, within bounds."""
        if params.structured_output is None:
            return
        if self.grammars is None:
            raise InvalidRequest(field, "structured output is not available for this model's tokenizer")
        self.grammars.check_size(params.structured_output.json_schema, field)

    def grammar(self, params: SamplingParams, field: str = "structured_output") -> Grammar | None:
        """The compiled grammar params.structured_output asks for. Compiling a large schema takes a while: call
        this on a thread of its own first (GenerationService.prepare does); submit() then finds it in the
        compiler's cache."""
        self.check_grammar(params, field)
        if params.structured_output is None:
            return None
        return self.grammars.compile(params.structured_output.json_schema, field)

    def embed(self, prompts: list[list[int]], field: str = "input") -> asyncio.Future[list[list[float]]]:
        """Each prompt's mean-pooled, L2-normalised last hidden state, computed between batch steps. The prompts
        are one job, queued all or none as submit_all's are; cancelling the future (the client left) drops the
        prompts not yet computed."""
        self._check_admitting()
        for i, prompt_ids in enumerate(prompts):
            where = f"{field}[{i}]" if len(prompts) > 1 else field
            if not prompt_ids:
                raise InvalidRequest(where, "must not be empty")
            if len(prompt_ids) > self.max_model_len:
                raise InvalidRequest(where, f"{len(prompt_ids)} tokens exceed max_model_len ({self.max_model_len})")
        self._reserve(len(prompts), field)
        self._loop = self._loop or asyncio.get_running_loop()
        job = EmbeddingJob([list(p) for p in prompts], self._loop.create_future())
        job.future.add_done_callback(lambda future: self._embedding_done(job, future))
        self._embedding_jobs.add(job)
        self._inbox.put(("embed", job))
        return job.future

    def _embedding_done(self, job: EmbeddingJob, future: asyncio.Future) -> None:
        self._embedding_jobs.discard(job)
        if future.cancelled():
            job.cancelled = True  # the engine drops its prompts not yet computed

    def _embedded(self, outcome: str, count: int, done: list[EmbeddingJob]) -> None:
        self._pending -= count
        self.on_embeddings(outcome, count)
        for job in done:
            if not job.future.done():
                job.future.set_result(job.vectors)

    def abort(self, request_id: int) -> None:
        self._inbox.put(("abort", request_id))

    def _deliver(self, events: list[tuple]) -> None:
        for stream, *event in events:
            try:
                stream.receive(*event)
            except Exception as err:  # noqa: BLE001 - one request's text handling must not fail the others
                logger.exception("request %d failed while its output was handled", stream.id)
                stream.finish("error", f"output handling failed: {err}")
                self.abort(stream.id)

    def _admitted(self, admitted: list[tuple[GenerationStream, int | None]]) -> None:
        """Requests left the queue: admitted, with the prompt tokens the prefix cache held, or cancelled while
        waiting (None)."""
        self._pending -= len(admitted)
        for stream, cached_tokens in admitted:
            stream.cached_tokens = cached_tokens

    # ---- engine thread ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._drain_inbox(block=not (self.core.has_work or self._embeddings)):
                    self.runner.heartbeat()
                    continue
                if self._embeddings:
                    self._embed_batch()
                if not self.core.has_work:
                    continue
                outputs, started = self.core.step()
                if started:  # before this step's events: a stream knows its cached tokens by its first token
                    self._call_loop(self._admitted, [(s.stream, s.num_cached_tokens) for s in started])
                self._preempted = self.core.num_preempted_waiting
                self._emit([_event(o) for o in outputs])
        except BaseException as err:  # noqa: BLE001 - any failure ends every request and the engine
            if self.error is not None:  # fail() came first; this is what it left the thread waiting on
                return
            logger.exception("engine failed")
            self.error = err
            self._fail_all(err)
            self.on_fatal(err)

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds, aborts and embeddings; False if a blocking wait timed out with nothing to do."""
        try:
            item = self._inbox.get(timeout=IDLE_HEARTBEAT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return not block
        events: list = []
        while item is not None:
            kind, payload = item
            if kind == "add":
                self.core.add(payload)
            elif kind == "embed":
                self._embeddings.add(payload)
            elif kind == "end_all":
                for seq in [*self.core.scheduler.waiting, *self.core.scheduler.running]:
                    self._cancel(seq.id, events, "error", SHUTTING_DOWN)
                self._embeddings.clear()
                self._call_loop(self._fail_embeddings, SHUTTING_DOWN)
            else:
                self._cancel(payload, events)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None
        self._emit(events)
        return True

    def _cancel(self, request_id: int, events: list, reason: str = "cancelled", error: str | None = None) -> None:
        seq = self.core.abort(request_id)
        if seq is None:
            return
        if seq.first_scheduled_at is None:
            self._call_loop(self._admitted, [(seq.stream, seq.num_cached_tokens)])
        events.append((seq.stream, [], seq.num_generated, reason, error, None))

    def _embed_batch(self) -> None:
        """Drop the jobs whose clients left, then compute one bounded batch of the others' prompts."""
        dropped = self._embeddings.drop_cancelled()
        if dropped:
            self._call_loop(self._embedded, "cancelled", dropped, [])
        batch = self._embeddings.next_batch()
        if batch:
            vectors = self.runner.embed([prompt for _, prompt in batch]).tolist()
            self._call_loop(self._embedded, "computed", len(batch), self._embeddings.finish(batch, vectors))

    def _fail_embeddings(self, message: str) -> None:
        for job in self._embedding_jobs:
            if not job.future.done():
                job.future.set_exception(EngineUnavailable(message))
        self._embedding_jobs.clear()

    def _emit(self, events: list) -> None:
        if events:
            self._call_loop(self._deliver, events)

    def _call_loop(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _fail_all(self, err: BaseException) -> None:
        scheduler = self.core.scheduler
        seqs = [*scheduler.waiting, *scheduler.running]
        scheduler.waiting.clear()
        scheduler.running.clear()
        self._emit([(s.stream, [], s.num_generated, "error", str(err), None) for s in seqs])
        self._call_loop(self._fail_embeddings, f"engine failed: {err}")


def _event(output: SequenceOutput) -> tuple:
    """(stream, shown token ids, tokens generated so far, finish reason, error, logprobs) for the stream."""
    seq = output.seq
    shown = [] if output.token is None or output.finish_reason == "stop" else [output.token]
    logprobs = [output.logprob] if shown and output.logprob else None
    return seq.stream, shown, seq.num_generated, output.finish_reason, output.error, logprobs
