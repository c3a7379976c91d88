"""How the engine's front reaches its core loop: in a process of its own (serving), or on a thread (tests).

Both give the front `send(message)` (never blocks the event loop) and `receive()` (blocks the front's reader
thread; None once the core has stopped or died), and the core loop a channel (predictor/engine/core_loop.py).

The process is started with `spawn` (a fresh interpreter: no copy of the front's threads, locks or event loop)
and talks over two one-way multiprocessing pipes, pickled. The front's sends go through a thread of their own
that batches whatever is queued into one write, so a burst of submits is one message and a large one (a
request with a long prompt) never blocks the event loop while the core is busy with a step. A 64-sequence step's
outputs pickle to 1.2 KB; sent to a spawned process and back they took ~100 us on the 2-core CI machine,
pickling included (vLLM uses zmq and msgspec; pipes were measured as fast enough, and need neither).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
from multiprocessing.connection import Connection

from predictor.engine.core_loop import CoreLoop
from predictor.engine.messages import CoreReady, LoadFailed

logger = logging.getLogger(__name__)

STOP_WAIT_S = 30


class CoreLoadFailed(RuntimeError):
    """The core process could not load the model; the message is one line."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class CoreStopped(RuntimeError):
    """The server stopped the core before it had loaded the model (a SIGTERM while loading)."""


class QueueChannel:
    """The core loop's end of two in-process queues."""

    def __init__(self, inbox: queue.SimpleQueue, outbox: queue.SimpleQueue):
        self._inbox = inbox
        self._outbox = outbox

    def receive(self, timeout: float) -> list | None:
        try:
            messages = [self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()]
        except queue.Empty:
            return None
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def send(self, message) -> None:
        self._outbox.put(message)


class PipeChannel:
    """The core loop's end of the two pipes; send() is safe from several threads (a lost rank's report)."""

    def __init__(self, inbox: Connection, outbox: Connection):
        self._inbox = inbox
        self._outbox = outbox
        self._lock = threading.Lock()

    def receive(self, timeout: float) -> list | None:
        if not self._inbox.poll(timeout):
            return None
        messages = list(self._inbox.recv())  # EOFError once the front is gone
        while self._inbox.poll(0):
            messages += self._inbox.recv()
        return messages

    def send(self, message) -> None:
        with self._lock:
            self._outbox.send(message)


class ThreadCore:
    """The core loop on a thread of this process."""

    def __init__(self, core, grammars=None):
        self.vocab_size = core.runner.vocab_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = CoreLoop(core, QueueChannel(self._inbox, self._outbox), grammars)
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run()
        except BaseException:  # noqa: BLE001 - CoreFailed is sent; the front ends every request
            pass
        finally:
            self._outbox.put(None)

    def start(self) -> None:
        self._thread.start()

    def send(self, message) -> None:
        self._inbox.put(message)

    def receive(self):
        return self._outbox.get()

    def join(self, timeout: float = STOP_WAIT_S) -> None:
        self._thread.join(timeout)

    def describe_exit(self) -> str:
        return "the engine core thread ended"


class ProcessCore:
    """The core loop in a spawned process: the front's handle on it."""

    def __init__(self, target, *args):
        """Start target(*args, inbox, outbox, parent_pid) in a new process; it must send its first message
        (ready, or why it could not load) and then run a CoreLoop over PipeChannel(inbox, outbox)."""
        context = multiprocessing.get_context("spawn")
        self._from_core, core_outbox = context.Pipe(duplex=False)
        core_inbox, self._to_core = context.Pipe(duplex=False)
        self.process = context.Process(target=target, args=(*args, core_inbox, core_outbox, os.getpid()),
                                       name="engine-core")
        self.process.start()
        core_inbox.close()  # the core's ends live in the core: their EOF is how each side sees the other go
        core_outbox.close()
        self.vocab_size = 0  # known once the core is ready
        self._killed = False
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_queued, name="engine-core-sender", daemon=True)

    def wait_ready(self) -> CoreReady:
        """Block until the core has loaded the model; CoreLoadFailed if it could not."""
        message = self.receive()
        if isinstance(message, CoreReady):
            self.vocab_size = message.vocab_size
            return message
        if isinstance(message, LoadFailed):
            self.process.join()
            raise CoreLoadFailed(message.message, message.exit_code)
        if self._killed:
            raise CoreStopped("the engine core was stopped while loading the model")
        raise CoreLoadFailed(f"{self.describe_exit()} while loading the model", 1)

    def start(self) -> None:
        self._sender.start()

    def send(self, message) -> None:
        self._outgoing.put(message)

    def _send_queued(self) -> None:
        while True:
            batch = [self._outgoing.get()]
            while True:
                try:
                    batch.append(self._outgoing.get_nowait())
                except queue.Empty:
                    break
            try:
                self._to_core.send(batch)
            except (OSError, ValueError):  # the core is gone: the reader sees it too
                return

    def receive(self):
        try:
            return self._from_core.recv()
        except (EOFError, OSError):
            return None

    def join(self, timeout: float = STOP_WAIT_S) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine core did not stop within %gs; killing it", timeout)
            self.kill()

    def kill(self) -> None:
        self._killed = True
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def describe_exit(self) -> str:
        self.process.join(1)
        code = self.process.exitcode
        if code is None:
            return "the engine core process stopped answering"
        if code < 0:
            return f"the engine core process was killed by signal {-code}"
        return f"the engine core process exited with code {code}"
