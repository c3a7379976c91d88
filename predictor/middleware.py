"""ASGI middleware: a request body size limit and per-route request counting.

Pure ASGI rather than BaseHTTPMiddleware so streamed responses pass through untouched.
"""

from __future__ import annotations

import json

from predictor import metrics


class BodySizeLimit:
    """413 for bodies over max_bytes, whether announced by Content-Length or sent chunked.

    The body is read up front (prompts are small) and replayed, so the limit holds before any route runs.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay_then_receive():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay_then_receive, send)

    async def _refuse(self, send) -> None:
        message = f"request body exceeds max_request_bytes ({self.max_bytes} bytes)"
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": "body",
                                     "code": 413}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RequestCounter:
    """predictor_http_requests_total{method, route, status}; route is the matched path template."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics.HTTP_REQUESTS.labels(scope["method"], template, str(status)).inc()
