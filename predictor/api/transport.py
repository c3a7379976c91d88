"""The HTTP transport: uvicorn's httptools protocol with the limits a server facing untrusted peers needs, so that
no peer can hold the server's connections or memory by sending slowly or sending too much.

- A request's line and headers: at most --max_header_bytes, counted as bytes arrive so nothing past the limit is
  buffered, and at most --max_headers lines (431); complete within --header_timeout of the connection opening or
  of the request's first byte (408).
- Its body: complete within --body_timeout of its headers (408; the body's size is BufferedBody's 413).
- Between requests: --keep_alive_timeout (uvicorn's own keep-alive).
- At most --max_connections open: one more is answered 503 and closed at once, and the open-file limit is raised,
  or the cap lowered, so that accepting never runs out of file descriptors; if it does anyway, asyncio's traceback
  per failed accept() becomes one line a minute.

A refusal is logged once a minute per kind, with how many there were, so a flood cannot flood the log.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from dataclasses import dataclass

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from predictor.api.errors import error_body
from predictor.api.middleware import TIMED_OUT

logger = logging.getLogger(__name__)
LOG_EVERY_S = 60.0
FD_RESERVE = 128  # file descriptors kept for what is not a connection: weights, logs, threads, process groups
LINGER_S, LINGER_BYTES = 2.0, 4 * 2**20  # read and dropped after a refusal, so the peer reads it
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float
    keep_alive_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(settings.max_header_bytes, settings.max_headers, settings.header_timeout, settings.body_timeout,
                   settings.keep_alive_timeout, settings.max_connections)


class RateLimitedWarning:
    """A warning logged at most once per LOG_EVERY_S, saying how many more there were in between."""

    def __init__(self) -> None:
        self.next_at = 0.0
        self.skipped = 0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.skipped += 1
            return
        more = f" ({self.skipped} more in the last {LOG_EVERY_S:.0f} s)" if self.skipped else ""
        logger.warning("%s%s; logged at most once a minute", message, more)
        self.next_at, self.skipped = now + LOG_EVERY_S, 0


WARNINGS: dict[int | str, RateLimitedWarning] = {}


def warn(kind: int | str, message: str) -> None:
    WARNINGS.setdefault(kind, RateLimitedWarning())(message)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with Limits (set on the subclass protocol_class makes)."""

    limits: Limits

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_head = True  # reading a request line and headers, or waiting for a request's first byte
        self.head_bytes = 0
        self.header_lines = 0
        self.refused = False
        self.lingering = 0  # bytes still read and dropped after a refusal
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self._refuse(503, f"--max_connections ({self.limits.max_connections}) are open; retry later")
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Fed to the parser so that at most max_header_bytes of a request line and headers are ever read."""
        if self.refused:
            return self._drop(data)
        while data and not self.refused and not self.transport.is_closing():
            if not self.in_head:
                super().data_received(data)
                return
            room = self.limits.max_header_bytes - self.head_bytes
            if room <= 0:
                self._refuse(431, f"the request line and headers exceed --max_header_bytes "
                                  f"({self.limits.max_header_bytes} bytes)")
                return
            piece, data = data[:room], data[room:]
            self.head_bytes += len(piece)
            super().data_received(piece)

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.timer is None:  # a connection's first request is timed from when the connection opened
            self._arm(self.limits.header_timeout, self._head_timed_out)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.refused:
            return
        self.header_lines += 1
        if self.header_lines > self.limits.max_headers:
            self._refuse(431, f"more than --max_headers ({self.limits.max_headers}) header lines")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        self.in_head = False
        self._arm(self.limits.body_timeout, self._body_timed_out)  # disarmed at once by a message without a body
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        self._disarm()
        self.in_head, self.head_bytes, self.header_lines = True, 0, 0
        super().on_message_complete()

    # Timeouts and refusals
    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self.timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _head_timed_out(self) -> None:
        self.timer = None
        if self.flow.read_paused:  # the server stopped reading (pipelining): not the peer's doing
            self._arm(self.limits.header_timeout, self._head_timed_out)
            return
        self._refuse(408, f"the request line and headers did not arrive within --header_timeout "
                          f"({self.limits.header_timeout:g} s)")

    def _body_timed_out(self) -> None:
        self.timer = None
        if self.flow.read_paused:
            self._arm(self.limits.body_timeout, self._body_timed_out)
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope[TIMED_OUT] = True  # the access log's status
            cycle.disconnected = True  # the route reads a disconnect and stops; nothing it sends goes out
            cycle.message_event.set()
        if cycle is not None and cycle.response_started:  # answered (a probe's 405) or answering: no 408 after it
            self.refused = True
            self.transport.close()
            return
        self._refuse(408, f"the request body did not arrive within --body_timeout ({self.limits.body_timeout:g} s)")

    def _refuse(self, status: int, message: str) -> None:
        """Answer status with message (OpenAI's error shape) and close; later parser callbacks are ignored. Unless
        the connection is one too many, what the peer goes on sending is read and dropped for up to LINGER_S and
        LINGER_BYTES first, as nginx's lingering close does: closing with unread data resets the connection, and
        the peer may then never read the answer."""
        self.refused = True
        self._disarm()
        peer = self.transport.get_extra_info("peername")
        warn(status, f"answered {status} to {peer[0] if peer else 'a client'} and closed the connection: {message}")
        body = orjson.dumps(error_body(status, message))
        head = f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        if self.transport.is_closing():
            return
        self.transport.write(STATUS_LINE[status] + head.encode() + body)
        if status == 503 or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.lingering = LINGER_BYTES
        self._arm(LINGER_S, self.transport.close)

    def _drop(self, data: bytes) -> None:
        self.lingering -= len(data)
        if self.lingering < 0:
            self.transport.close()


def protocol_class(limits: Limits) -> type[LimitedHttpProtocol]:
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": limits})


def connection_cap(requested: int) -> int:
    """requested, once the soft open-file limit has been raised (within the hard one) to hold that many connections
    and FD_RESERVE more; lowered, with a warning, to what the hard limit leaves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = requested + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return requested
    cap = max(1, soft - FD_RESERVE)
    logger.warning("--max_connections lowered from %d to %d: the open-file limit (ulimit -n) is %d and %d are kept "
                   "for the rest of the server", requested, cap, soft, FD_RESERVE)
    return cap


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The event loop's exception handler: an accept() that failed for want of file descriptors or memory is one
    line a minute (asyncio logs a traceback for each attempt, thousands a second); the rest as asyncio logs it."""
    err = context.get("exception")
    if isinstance(err, OSError) and err.errno in OUT_OF_RESOURCES:
        warn("accept", f"cannot accept connections: {err.strerror}")
        return
    loop.default_exception_handler(context)
