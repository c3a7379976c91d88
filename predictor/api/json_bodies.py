"""JSON bodies kept off the event loop: a request's body is parsed and checked once, and a large one in a worker
thread; a route takes that parsed body (ParsedBodyRoute) rather than parsing it again, and validates a large one
in the worker too; a large answer is built and rendered there (json_response).

One thread parses and one renders, whatever the number of large bodies in flight: the event loop competes for
the GIL with at most those two (a long C call, json.loads of a 4 MiB body for one, holds it throughout), so probes
and small requests are answered while large bodies come and go.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

INLINE_BYTES = 64 * 2**10  # smaller bodies are parsed on the event loop: a thread hop would cost more
MAX_DEPTH = 100  # nesting levels; deeper would meet Python's recursion limit somewhere downstream
PARSED_BODY = "predictor.parsed_body"  # the scope key BufferedBody leaves a ParsedBody under
ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
JSON_TYPE = re.compile(r"^application/([\w.+-]+\+)?json\b", re.I)
NOT_UNICODE = "not valid Unicode (a lone UTF-16 surrogate, or bytes that are not UTF-8); send text as UTF-8"

_parsing = ThreadPoolExecutor(1, thread_name_prefix="json-parse")
_rendering = ThreadPoolExecutor(1, thread_name_prefix="json-render")


class BodyRefused(ValueError):
    """A body no route accepts: message names the field (param) and what is wrong."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


@dataclass
class ParsedBody:
    value: Any
    large: bool  # over INLINE_BYTES: validated against the route's model in the worker


def is_json(content_type: str | None) -> bool:
    """Bodies read as JSON: those that say so, and those that say nothing (KServe's V1 routes parse them)."""
    return not content_type or JSON_TYPE.match(content_type) is not None


async def parse(body: bytes) -> ParsedBody:
    """The body as JSON, as FastAPI would parse it (Python's json); BodyRefused if it is not JSON, is nested deeper
    than MAX_DEPTH or holds a string or key that is not valid Unicode."""
    large = len(body) > INLINE_BYTES
    value = await asyncio.get_running_loop().run_in_executor(_parsing, parse_now, body) if large else parse_now(body)
    return ParsedBody(value, large)


def parse_now(body: bytes) -> Any:
    try:
        text, undecodable = body.decode("utf-8"), False
    except UnicodeDecodeError:  # each byte that is not UTF-8 becomes a lone surrogate, found below with its field
        text, undecodable = body.decode("utf-8", "surrogateescape"), True
    try:
        value = json.loads(text)
    except RecursionError:
        raise BodyRefused(f"body: nested deeper than {MAX_DEPTH} levels", "body") from None
    except ValueError as err:
        raise BodyRefused(f"body: not valid JSON ({err})", "body") from None
    problem = _first_problem(value, check_text=undecodable or ESCAPED_SURROGATE.search(body) is not None)
    if problem is not None:
        raise BodyRefused(*problem)
    return value


def _first_problem(value: Any, check_text: bool) -> tuple[str, str] | None:
    """(message, field) for the first container nested deeper than MAX_DEPTH or, with check_text, the first string
    or key that is not valid Unicode; None if there is neither. Iterative: the walk itself has no depth limit."""
    if check_text and isinstance(value, str) and not _is_unicode(value):
        return f"body: {NOT_UNICODE}", "body"
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            return f"body: nested deeper than {MAX_DEPTH} levels", "body"
        for key, item in node.items() if type(node) is dict else enumerate(node) if type(node) is list else ():
            if check_text and type(key) is str and not _is_unicode(key):
                return _not_unicode(path + (key,))
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, path + (key,)))
            elif check_text and kind is str and not _is_unicode(item):
                return _not_unicode(path + (key,))
    return None


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_unicode(path: tuple) -> tuple[str, str]:
    field = ".".join(_printable(part) if isinstance(part, str) else str(part) for part in path)
    return f"{field}: {NOT_UNICODE}", field


def _printable(key: str) -> str:
    """A key as an error message can carry it: bytes that were not UTF-8 as \\xNN, lone surrogates as \\uNNNN."""
    try:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return key.encode("utf-8", "backslashreplace").decode("utf-8")


class ParsedBodyRoute(APIRoute):
    """A route that takes the body BufferedBody parsed rather than parsing it again on the event loop, and
    validates a large one against its model in the worker: FastAPI then finds a finished model to pass on."""

    def get_route_handler(self):
        handle = super().get_route_handler()
        one_body = self.body_field if not getattr(self, "_embed_body_fields", True) else None

        async def handler(request: Request) -> Response:
            parsed = request.scope.get(PARSED_BODY)
            if parsed is not None and parsed.large and one_body is not None:
                loop = asyncio.get_running_loop()
                value, errors = await loop.run_in_executor(_parsing, _validate, one_body, parsed.value)
                if errors:
                    raise RequestValidationError(errors, body=parsed.value)
                parsed.value = value
            return await handle(_ParsedRequest(request.scope, request.receive))

        return handler


def _validate(field, value: Any) -> tuple[Any, list]:
    return field.validate(value, {}, loc=("body",))  # as FastAPI validates a body, errors in its shape


class _ParsedRequest(Request):
    async def json(self) -> Any:
        parsed = self.scope.get(PARSED_BODY)
        return await super().json() if parsed is None else parsed.value


async def json_response(build: Callable[[], Any], status_code: int = 200) -> Response:
    """The answer build() makes (a pydantic model, or values pydantic can serialise), built and rendered to JSON
    in the worker: n choices with top log-probabilities, or many embeddings, run to megabytes."""
    body = await asyncio.get_running_loop().run_in_executor(_rendering, _render, build)
    return Response(body, status_code=status_code, media_type="application/json")


def _render(build: Callable[[], Any]) -> bytes:
    """build()'s answer as JSON, with the cyclic garbage collector paused meanwhile: a large answer is a million
    short-lived objects, and each full collection their growth sets off is one pass over every object in the
    process with the GIL held (a second's stall of the event loop, measured); reference counting frees them all
    before the collector is back."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return pydantic_core.to_json(build())
    finally:
        if paused:
            gc.enable()
