"""The core's side of the engine: apply the front's requests between steps, step, send one message per pass.

It runs in the engine core's own process (predictor/core_process.py), or on a thread for tests with a fake
runner (predictor/engine/core_client.py), and speaks only the messages of predictor/engine/messages.py over a
channel: `receive(timeout)` gives the messages queued since the last call (None when the wait timed out, and
EOFError when the front is gone), `send(message)` hands one over. Between two steps it applies every queued
request (adds, aborts, embedding jobs), computes one bounded batch of embeddings
(predictor/engine/embedding_queue.py), then sends the step's events, admissions and the scheduler's figures
together. Any exception out of a step (the device or a tensor-parallel rank failed) ends the loop with
CoreFailed; a failure that belongs to one request ends only that request.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from predictor.engine.core import EngineCore, SequenceOutput
from predictor.engine.embedding_queue import EmbeddingJob, EmbeddingQueue
from predictor.engine.errors import InvalidRequest
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
from predictor.engine.sequence import Sequence
from predictor.engine.structured_output import Grammars

logger = logging.getLogger(__name__)

IDLE_HEARTBEAT_S = 1.0
COMPILE_POLL_S = 0.002  # how often an idle loop looks for a request's grammar to be compiled
GRAMMAR_THREADS = 2


class CoreLoop:
    def __init__(self, core: EngineCore, channel, grammars: Grammars | None = None):
        self.core = core
        self.runner = core.runner
        self.channel = channel
        self.grammars = grammars  # None: the front refuses structured output
        self._grammar_threads = ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="grammar")
        self._compiling: list[tuple[AddRequest, Future]] = []  # requests waiting for their grammar, in order
        self._embeddings = EmbeddingQueue(core.scheduler.max_prefill_tokens)
        self._embedding_jobs: dict[int, EmbeddingJob] = {}
        self._stopped = False
        self._failed = threading.Event()

    @torch.inference_mode()
    def run(self) -> None:
        """Until Stop (or the front is gone); a failure is sent as CoreFailed, then raised."""
        try:
            while not self._stopped:
                busy = self.core.has_work or bool(self._embeddings)
                try:
                    messages = self.channel.receive(0 if busy else COMPILE_POLL_S if self._compiling
                                                    else IDLE_HEARTBEAT_S)
                except EOFError:  # the front is gone: nobody to serve
                    return
                compiled = self._compiling and self._compiling[0][1].done()
                if messages is None and not busy and not compiled:
                    if not self._compiling:
                        self.runner.heartbeat()
                    continue
                out = StepOutput()
                for message in messages or ():
                    self._apply(message, out)
                if self._stopped:
                    return
                self._add_compiled(out)
                if self._embeddings:
                    self._embed_batch(out)
                if self.core.has_work:
                    self._step(out)
                scheduler = self.core.scheduler
                out.running = len(scheduler.running)
                out.preempted = self.core.num_preempted_waiting
                out.kv_cache_usage = self.core.kv_cache_usage
                self.channel.send(out)
        except BaseException as err:  # noqa: BLE001 - any failure ends every request and the core
            if not self._failed.is_set():
                logger.exception("engine failed")
                self.fail(err)
            raise
        finally:
            self._grammar_threads.shutdown(wait=False, cancel_futures=True)

    def fail(self, err: BaseException) -> None:
        """Tell the front the core is done for (from the loop, or from a thread that found a rank lost)."""
        if not self._failed.is_set():
            self._failed.set()
            self.channel.send(CoreFailed(str(err)))

    def _step(self, out: StepOutput) -> None:
        outputs, started = self.core.step()
        out.admitted += [(seq.id, seq.num_cached_tokens) for seq in started]
        out.events += [_event(output) for output in outputs]

    def _apply(self, message, out: StepOutput) -> None:
        if isinstance(message, AddRequest):
            if message.json_schema is None and not self._compiling:
                self._add(message)
            else:  # behind the requests still waiting for a grammar: they are admitted in the order they came
                self._compiling.append((message, self._compile(message.json_schema)))
        elif isinstance(message, CompileGrammar):
            self._compile(message.json_schema, message.field).add_done_callback(
                lambda done, request_id=message.id: self.channel.send(GrammarCompiled(request_id, _refusal(done))))
        elif isinstance(message, Abort):
            self._cancel(message.id, out)
        elif isinstance(message, EmbedRequest):
            job = EmbeddingJob(message.id, message.prompts)
            self._embedding_jobs[job.id] = job
            self._embeddings.add(job)
        elif isinstance(message, CancelEmbed):
            job = self._embedding_jobs.pop(message.id, None)
            if job is not None:
                job.cancelled = True
        elif isinstance(message, EndAll):
            ids = [r.id for r, _ in self._compiling] + [s.id for s in self.core.scheduler.waiting]
            for request_id in [*ids, *(seq.id for seq in self.core.scheduler.running)]:
                self._cancel(request_id, out, "error", message.error)
            self._embeddings.clear()
            self._embedding_jobs.clear()
        elif isinstance(message, CheckDevice):
            self.channel.send(DeviceChecked(message.id, self._device_problem()))
        elif isinstance(message, Stop):
            self._stopped = True
        else:
            raise TypeError(f"the core loop got an unknown message: {message!r}")

    def _compile(self, json_schema: str | None, field: str = "structured_output") -> Future:
        if json_schema is None:
            done: Future = Future()
            done.set_result(None)
            return done
        if self.grammars is None:
            raise RuntimeError("structured output was asked of a core without grammars")
        return self._grammar_threads.submit(self.grammars.compile_text, json_schema, field)

    def _add(self, request: AddRequest, grammar=None) -> None:
        self.core.add(Sequence(request.id, request.prompt_ids, request.params, request.stop_ids, grammar=grammar))

    def _add_compiled(self, out: StepOutput) -> None:
        """Add the requests whose grammars are compiled, in the order they came."""
        while self._compiling and self._compiling[0][1].done():
            request, compiled = self._compiling.pop(0)
            refusal = _refusal(compiled)
            if refusal is None:
                self._add(request, compiled.result())
            else:  # the front compiled it before (prepare), so this is rare: a request that skipped that
                out.admitted.append((request.id, None))
                out.events.append((request.id, [], 0, "error", refusal, None))

    def _device_problem(self) -> str | None:
        try:
            self.runner.check_device()
        except Exception as err:  # noqa: BLE001 - reported to the front's probe
            logger.exception("the device check failed")
            return str(err) or type(err).__name__
        return None

    def _cancel(self, request_id: int, out: StepOutput, reason: str = "cancelled", error: str | None = None) -> None:
        waiting = next((i for i, (request, _) in enumerate(self._compiling) if request.id == request_id), None)
        if waiting is not None:
            self._compiling.pop(waiting)
            out.admitted.append((request_id, None))
            out.events.append((request_id, [], 0, reason, error, None))
            return
        seq = self.core.abort(request_id)
        if seq is None:
            return
        if seq.first_scheduled_at is None:
            out.admitted.append((seq.id, seq.num_cached_tokens))
        out.events.append((seq.id, [], seq.num_generated, reason, error, None))

    def _embed_batch(self, out: StepOutput) -> None:
        """Drop the jobs whose clients left, then compute one bounded batch of the others' prompts."""
        dropped = self._embeddings.drop_cancelled()
        if dropped:
            out.embedded.append(("cancelled", dropped))
        batch = self._embeddings.next_batch()
        if batch:
            vectors = self.runner.embed([prompt for _, prompt in batch]).tolist()
            out.embedded.append(("computed", len(batch)))
            for job in self._embeddings.finish(batch, vectors):
                self._embedding_jobs.pop(job.id, None)
                out.embeddings_done.append((job.id, job.vectors))


def _refusal(compiled: Future) -> str | None:
    """Why a compile failed (InvalidRequest's detail), None if it did not."""
    err = compiled.exception()
    if err is None:
        return None
    return err.detail if isinstance(err, InvalidRequest) else f"compiling the grammar failed: {err}"


def _event(output: SequenceOutput) -> SequenceEvent:
    seq = output.seq
    shown = [] if output.token is None or output.finish_reason == "stop" else [output.token]
    logprobs = [output.logprob] if shown and output.logprob else None
    return seq.id, shown, seq.num_generated, output.finish_reason, output.error, logprobs
