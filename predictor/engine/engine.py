"""The engine's front: requests in from the event loop, the core's steps on a thread of their own, events back.

submit() validates and queues a request and returns a GenerationStream. The engine thread drains the inbox
(new requests, aborts, embedding jobs) between steps and hands each step's events to the event loop in one
call. Any exception out of a step (the device or a tensor-parallel rank failed) ends every request and the
engine; a failure that belongs to one request ends only that request.
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
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # submitted, not yet admitted to the batch (event-loop side)
        self._preempted = 0  # waiting again after a preemption (engine-thread side, read by stats)
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
        while self._pending or self.core.has_work or self._embeds:
            await asyncio.sleep(poll_s)

    def check_device(self) -> None:
        """Raises if the model's device cannot run a tiny operation."""
        self.runner.check_device()

    def _check_admitting(self) -> None:
        if not self.alive:
            raise EngineUnavailable("the engine has " + ("failed (see the server log)" if self.error else "stopped"))
        if self._draining:
            raise EngineUnavailable(SHUTTING_DOWN)

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
        vocab_size = self.runner.vocab_size
        beyond = next((i for i, t in enumerate(params.stop_token_ids) if t >= vocab_size), None)
        if beyond is not None:
            raise InvalidRequest(f"stop_token_ids.{beyond}", f"{params.stop_token_ids[beyond]} is not a token id of "
                                 f"this model: must be < {vocab_size}, the vocabulary size")
        if self._pending >= self.max_queue:
            raise EngineOverloaded(f"queue is full: {self._pending} requests waiting (max_queue={self.max_queue})")
        grammar = self.grammar(params)
        self._loop = self._loop or asyncio.get_running_loop()
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        request_id = next(self._ids)
        stream = GenerationStream(request_id, params, self.tokenizer, prompt_ids, self.abort, self.on_finished)
        self._pending += 1
        self._inbox.put(("add", Sequence(request_id, list(prompt_ids), params, stop_ids, stream, grammar=grammar)))
        return stream

    def grammar(self, params: SamplingParams, field: str = "structured_output") -> Grammar | None:
        """The compiled grammar params.structured_output asks for. Compiling a large schema takes a while: call
        this off the event loop first (as asyncio.to_thread(engine.grammar, params, field)); submit() then finds
        it in the compiler's cache."""
        if params.structured_output is None:
            return None
        if self.grammars is None:
            raise InvalidRequest(field, "structured output is not available for this model's tokenizer")
        return self.grammars.compile(params.structured_output.json_schema, field)

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
            try:
                stream.receive(*event)
            except Exception as err:  # noqa: BLE001 - one request's text handling must not fail the others
                logger.exception("request %d failed while its output was handled", stream.id)
                stream.finish("error", f"output handling failed: {err}")
                self.abort(stream.id)

    def _admitted(self, count: int) -> None:
        self._pending -= count

    # ---- engine thread ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._drain_inbox(block=not self.core.has_work):
                    self.runner.heartbeat()
                    continue
                outputs, started = self.core.step()
                if started:
                    self._call_loop(self._admitted, len(started))
                self._preempted = self.core.num_preempted_waiting
                self._emit([_event(o) for o in outputs])
        except BaseException as err:  # noqa: BLE001 - any failure ends every request and the engine
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
                self._run_embedding(*payload)
            elif kind == "end_all":
                for seq in [*self.core.scheduler.waiting, *self.core.scheduler.running]:
                    self._cancel(seq.id, events, "error", SHUTTING_DOWN)
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
            self._call_loop(self._admitted, 1)
        events.append((seq.stream, [], seq.num_generated, reason, error, None))

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
        self._call_loop(self._fail_embeddings, str(err))


def _event(output: SequenceOutput) -> tuple:
    """(stream, shown token ids, tokens generated so far, finish reason, error, logprobs) for the stream."""
    seq = output.seq
    shown = [] if output.token is None or output.finish_reason == "stop" else [output.token]
    logprobs = [output.logprob] if shown and output.logprob else None
    return seq.stream, shown, seq.num_generated, output.finish_reason, output.error, logprobs
