"""The engine's front, in the HTTP process: requests in from the event loop, the core loop's outputs back.

submit() validates and queues a request and returns a GenerationStream; submit_all() queues a request's
several generations together or none; embed() queues a request's prompts as one embedding job. Every queued
generation and embedding prompt counts against max_queue until it is admitted to the batch (or computed).
The core loop (predictor/engine/core_loop.py) runs in a process of its own (or on a thread, in tests): requests
go to it as the messages of predictor/engine/messages.py, and a reader thread hands each message it sends back
(one per step: events, admissions, embeddings, the scheduler's figures) to the event loop in one call, where
every piece of the front's state lives. If the core fails or dies, every request ends with the error and
on_fatal runs; a failure that belongs to one request ends only that request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable

from predictor.engine.errors import SHUTTING_DOWN, EngineOverloaded, EngineUnavailable, InvalidRequest
from predictor.engine.messages import (
    Abort,
    AddRequest,
    CancelEmbed,
    CheckDevice,
    CompileGrammar,
    CoreFailed,
    DeviceChecked,
    EmbedRequest,
    EndAll,
    GrammarCompiled,
    SequenceEvent,
    StepOutput,
    Stop,
)
from predictor.engine.sampling_params import SamplingParams
from predictor.engine.stream import Finished, GenerationStream
from predictor.engine.structured_output import schema_text

logger = logging.getLogger(__name__)

DEVICE_CHECK_WAIT_S = 60


class EngineFailed(RuntimeError):
    """The core loop ended on an error, or its process died."""


class Engine:
    def __init__(
        self,
        core,
        tokenizer,
        *,
        max_model_len: int,
        max_queue: int,
        eos_token_ids: set[int],
        max_schema_bytes: int | None = None,
        on_fatal: Callable[[BaseException], None] = lambda err: None,
        on_finished: Callable[[GenerationStream, Finished], None] = lambda stream, event: None,
        on_embeddings: Callable[[str, int], None] = lambda outcome, count: None,
    ):
        self.core = core  # a ProcessCore or a ThreadCore (predictor/engine/core_client.py)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.eos_token_ids = eos_token_ids
        self.max_schema_bytes = max_schema_bytes  # None: structured output is refused (the core has no grammars)
        self.on_fatal = on_fatal
        self.on_finished = on_finished
        self.on_embeddings = on_embeddings  # (outcome "computed" or "cancelled", prompts), on the event loop
        self.error: BaseException | None = None
        self._pending = 0  # generations not yet admitted to the batch + embedding prompts not yet computed
        self._streams: dict[int, GenerationStream] = {}  # until the core's last event for each
        self._embeddings: dict[int, asyncio.Future] = {}  # not yet answered
        self._figures = StepOutput()  # the core's last running / preempted / KV usage (set by the reader)
        self._probes: dict[int, tuple[threading.Event, list]] = {}
        self._compiles: dict[int, asyncio.Future[str | None]] = {}  # grammars the core is compiling
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._draining = False
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.core.vocab_size

    def start(self) -> None:
        self.core.start()
        self._reader.start()

    def stop(self) -> None:
        """Stop the core loop (and its process) and wait for it."""
        self._stopping = True
        self.core.send(Stop())
        self.core.join()
        self._reader.join(timeout=5)

    @property
    def alive(self) -> bool:
        return self.error is None and self._reader.is_alive()

    @property
    def stats(self) -> dict[str, float]:
        figures = self._figures
        return {
            "running": figures.running,
            "waiting": self._pending + figures.preempted,
            "kv_cache_usage": figures.kv_cache_usage,
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
        self.core.send(EndAll(SHUTTING_DOWN))
        self._fail_embeddings(SHUTTING_DOWN)

    async def drained(self, poll_s: float = 0.05) -> None:
        while self._pending or self._streams or self._embeddings:
            await asyncio.sleep(poll_s)

    def fail(self, err: BaseException) -> None:
        """The engine is unusable: readiness turns 503 and on_fatal runs."""
        if self.error is None:
            self.error = err
            self.on_fatal(err)

    def check_device(self) -> None:
        """Raises if the model's device cannot run a tiny operation (asked of the core between two steps; call
        it off the event loop)."""
        probe_id = next(self._ids)
        answered, problem = threading.Event(), []
        self._probes[probe_id] = (answered, problem)
        self.core.send(CheckDevice(probe_id))
        try:
            if not answered.wait(DEVICE_CHECK_WAIT_S):
                raise TimeoutError(f"the engine core did not answer within {DEVICE_CHECK_WAIT_S}s")
        finally:
            self._probes.pop(probe_id, None)
        if problem[0] is not None:
            raise RuntimeError(problem[0])

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
        schemas = [self._schema(params) for _, params in requests]
        self._reserve(len(requests), field)
        self._loop = self._loop or asyncio.get_running_loop()
        streams = []
        for (prompt_ids, params), schema in zip(requests, schemas, strict=True):
            stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
            request_id = next(self._ids)
            stream = GenerationStream(request_id, params, self.tokenizer, prompt_ids, self.abort, self.on_finished)
            self._streams[request_id] = stream
            self.core.send(AddRequest(request_id, list(prompt_ids), params, stop_ids, schema))
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
        vocab_size = self.vocab_size
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
        self._schema(params, field)

    def _schema(self, params: SamplingParams, field: str = "structured_output") -> str | None:
        if params.structured_output is None:
            return None
        if self.max_schema_bytes is None:
            raise InvalidRequest(field, "structured output is not available for this model's tokenizer")
        return schema_text(params.structured_output.json_schema, field, self.max_schema_bytes)

    async def compile_grammar(self, params: SamplingParams, field: str = "structured_output") -> None:
        """Compile the grammar params.structured_output asks for, on the core's grammar threads (a large schema
        takes seconds; steps go on meanwhile), so that submit() finds it in the compiler's cache; one xgrammar
        cannot use is an InvalidRequest naming field."""
        schema = self._schema(params, field)
        if schema is None:
            return
        self._check_admitting()
        self._loop = self._loop or asyncio.get_running_loop()
        compile_id = next(self._ids)
        compiled = self._compiles[compile_id] = self._loop.create_future()
        self.core.send(CompileGrammar(compile_id, schema, field))
        try:
            refusal = await compiled
        finally:
            self._compiles.pop(compile_id, None)
        if refusal is not None:
            raise InvalidRequest(field, refusal)

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
        job_id = next(self._ids)
        future = self._loop.create_future()
        future.add_done_callback(lambda done: self._embedding_done(job_id, done))
        self._embeddings[job_id] = future
        self.core.send(EmbedRequest(job_id, [list(p) for p in prompts]))
        return future

    def _embedding_done(self, job_id: int, future: asyncio.Future) -> None:
        self._embeddings.pop(job_id, None)
        if future.cancelled():
            self.core.send(CancelEmbed(job_id))  # the core drops its prompts not yet computed

    def abort(self, request_id: int) -> None:
        self.core.send(Abort(request_id))

    def _apply(self, out: StepOutput) -> None:
        for request_id, cached_tokens in out.admitted:  # before the events: a stream knows them by its first token
            self._pending -= 1
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.cached_tokens = cached_tokens
        for outcome, count in out.embedded:
            self._pending -= count
            self.on_embeddings(outcome, count)
        for job_id, vectors in out.embeddings_done:
            future = self._embeddings.pop(job_id, None)
            if future is not None and not future.done():
                future.set_result(vectors)
        self._deliver(out.events)

    def _deliver(self, events: list[SequenceEvent]) -> None:
        for request_id, tokens, generated, reason, error, logprobs in events:
            stream = self._streams.pop(request_id, None) if reason else self._streams.get(request_id)
            if stream is None:
                continue
            try:
                stream.receive(tokens, generated, reason, error, logprobs)
            except Exception as err:  # noqa: BLE001 - one request's text handling must not fail the others
                logger.exception("request %d failed while its output was handled", stream.id)
                stream.finish("error", f"output handling failed: {err}")
                self.abort(stream.id)

    def _fail_embeddings(self, message: str) -> None:
        for future in list(self._embeddings.values()):
            if not future.done():
                future.set_exception(EngineUnavailable(message))
        self._embeddings.clear()

    def _compiled(self, answer: GrammarCompiled) -> None:
        compiled = self._compiles.get(answer.id)
        if compiled is not None and not compiled.done():
            compiled.set_result(answer.error)

    def _fail_all(self, message: str) -> None:
        for compiled in self._compiles.values():
            if not compiled.done():
                compiled.set_exception(EngineUnavailable(f"engine failed: {message}"))
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.receive([], stream.completion_tokens, "error", message, None)
        self._fail_embeddings(f"engine failed: {message}")

    # ---- reader thread ---------------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            message = self.core.receive()
            if isinstance(message, StepOutput):
                self._figures = message
                self._call_loop(self._apply, message)
            elif isinstance(message, GrammarCompiled):
                self._call_loop(self._compiled, message)
            elif isinstance(message, DeviceChecked):
                probe = self._probes.get(message.id)
                if probe is not None:
                    probe[1].append(message.error)
                    probe[0].set()
            elif isinstance(message, CoreFailed):
                self._failed(EngineFailed(message.error))
            elif message is None:  # the core stopped, or died without a word
                if not self._stopping:
                    self._failed(EngineFailed(self.core.describe_exit()))
                return

    def _failed(self, err: EngineFailed) -> None:
        if self.error is not None:
            return
        logger.error("engine failed: %s", err)
        self.error = err
        self._call_loop(self._fail_all, str(err))
        self.on_fatal(err)

    def _call_loop(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)
