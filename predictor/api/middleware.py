"""ASGI middleware around every route (pure ASGI, so streamed responses pass through untouched):

- BufferedBody reads the whole body of a request that can have one (413 past max_request_bytes) and parses a JSON
  one (json_bodies: off the event loop when large; 400 naming the field for a string that is not valid Unicode,
  for nesting too deep, for KServe's model_version and a bad binary-extension header), then runs the route and
  cancels it the moment its client goes away: a generation, streamed or not, on any route, stops and frees its
  KV cache. Probes and GET routes are passed on without their body being read.
- InternalErrors turns an unexpected exception into one logged traceback and a 500 without internals.
- AccessLog counts every request by route and status (499 when the client left first, 408 when it was too slow
  to send its body) and logs one line for each, probes and /metrics only with --log_requests.
- RequireKey, with --api_key, asks every route but the probes for the key.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time

from predictor import metrics
from predictor.api import json_bodies
from predictor.api.errors import INTERNAL_ERROR, error_response
from predictor.api.json_bodies import PARSED_BODY, BodyRefused

logger = logging.getLogger("predictor.access")
errors_logger = logging.getLogger("predictor.api")

DISCONNECTED = "predictor.disconnected"  # set in the scope when the client left before the response ended
TIMED_OUT = "predictor.timed_out"  # set by the transport when the body did not arrive within --body_timeout
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it
REQUEST_TIMEOUT = 408
BODILESS = frozenset({"GET", "HEAD", "OPTIONS"})
VERSIONED_V2 = re.compile(r"^/v2/models/[^/]+/versions/")
V2_JSON_LENGTH = b"inference-header-content-length"  # KServe's binary extension: the JSON's length, then tensors
PROBE_PATHS = (r"$|health$|openai/health$|healthz$|metrics$|version$|v2/health/|v2/?$|v1/models/[^/:]+$|"
               r"v2/models/[^/]+(/ready)?$")
PROBES = re.compile(rf"^/({PROBE_PATHS})")
OPEN_PATHS = re.compile(rf"^/({PROBE_PATHS}|openapi\.json$)")  # what needs no API key


class BufferedBody:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] in BODILESS or PROBES.match(scope["path"]):
            try:
                _check_version(scope)
            except BodyRefused as refusal:
                return await _refused(scope, receive, send, refusal)
            return await self.app(scope, receive, send)  # nothing reads the body: a POST to a probe is a 405
        body = await self._read(scope, receive, send)
        if body is None:
            return
        try:
            _check_version(scope)
            _check_binary_length(scope, body)
            content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            if body and json_bodies.is_json(content_type):
                scope[PARSED_BODY] = await json_bodies.parse(body)
        except BodyRefused as refusal:
            return await _refused(scope, receive, send, refusal)
        await self._run(scope, receive, send, body)

    async def _read(self, scope, receive, send) -> bytes | None:
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                scope[DISCONNECTED] = True
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _too_large(self, scope, receive, send) -> None:
        message = f"request body exceeds max_request_bytes ({self.max_bytes} bytes)"
        await error_response(scope["path"], 413, message, "body")(scope, receive, send)

    async def _run(self, scope, receive, send, body: bytes) -> None:
        gone = asyncio.Event()
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        route = asyncio.ensure_future(self.app(scope, replay, send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({route, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not route.done():
                scope[DISCONNECTED] = True
                route.cancel()
            try:
                await route
            except asyncio.CancelledError:
                if not scope.get(DISCONNECTED):
                    raise
        finally:
            watcher.cancel()


async def _refused(scope, receive, send, refusal: BodyRefused) -> None:
    await error_response(scope["path"], 400, refusal.message, refusal.param)(scope, receive, send)


def _check_version(scope) -> None:
    """KServe's model_version is refused on every route: one model is served, unversioned."""
    if VERSIONED_V2.match(scope["path"]) or b"model_version=" in scope.get("query_string", b""):
        raise BodyRefused("model_version: this server serves one model, unversioned; leave model_version out",
                          "model_version")


def _check_binary_length(scope, body: bytes) -> None:
    """KServe's binary extension: the JSON's length, then tensors; a length that is not one within the body."""
    declared = dict(scope["headers"]).get(V2_JSON_LENGTH)
    if declared is not None and not (declared.isdigit() and int(declared) <= len(body)):
        name = V2_JSON_LENGTH.decode()
        raise BodyRefused(f"{name}: must be the length in bytes of the JSON that starts the body, a whole number "
                          f"from 0 to {len(body)}; got {declared[:40].decode('latin-1')!r}", name)


class InternalErrors:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - the one place unexpected errors become a 500
            errors_logger.exception("%s %s failed", scope["method"], scope["path"])
            if not started:
                response = error_response(scope["path"], 500, INTERNAL_ERROR)
                await response(scope, receive, send)


class AccessLog:
    def __init__(self, app, log_probes: bool = False):
        self.app = app
        self.log_probes = log_probes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), None

        async def tracked(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            if scope.get(TIMED_OUT):
                status = REQUEST_TIMEOUT
            elif scope.get(DISCONNECTED):  # before the response ended, even if its head (a stream's 200) was sent
                status = CLIENT_CLOSED_REQUEST
            elif status is None:
                status = 500
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            if self.log_probes or not (scope["method"] == "GET" and PROBES.match(scope["path"])):
                logger.info("%s %s %d %.1fms", scope["method"], scope["path"], status,
                            (time.perf_counter() - start) * 1000)


class RequireKey:
    """With --api_key, every route but the probes, /metrics and the OpenAPI document needs 'Bearer <key>' (the
    scheme in any case, as RFC 7235 has it)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or OPEN_PATHS.match(scope["path"]):
            return await self.app(scope, receive, send)
        scheme, _, credentials = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        given = credentials.lstrip(b" ") if scheme.lower() == b"bearer" else b""
        if not hmac.compare_digest(given, self.expected):
            response = error_response(scope["path"], 401, "missing or wrong API key")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
