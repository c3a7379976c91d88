"""What every answer to a fuzzed request must be: below 500, and in the shape its route documents.

- 2xx JSON and FastAPI's 422 (KServe's routes): the OpenAPI document's schema for that status (schemathesis'
  response_schema_conformance);
- a stream: OpenAI's server-sent events (JSON chunks with choices, then [DONE]; on the Responses API, named
  events numbered in order, ending with response.completed or response.incomplete) or the worker's
  NUL-delimited WorkerOutput objects, none of them an error (nor /worker_generate's one object, which FastChat
  answers as a 200 with an error_code);
- any other 4xx: our error shape, {"error": {"message", "type", "param", "code"}} on our routes and KServe's
  {"error": message} on its V1/V2 routes (predictor/api/errors.py);
- a 5xx (a failure in itself) only ever says INTERNAL_ERROR, never an exception's class or message.
"""

from __future__ import annotations

import json
import re

from schemathesis.specs.openapi.checks import response_schema_conformance

from predictor.api.errors import INTERNAL_ERROR, KSERVE_PATHS

# A traceback or a source location in an error's body. (A 4xx may echo the input, which can hold anything, so
# exception class names are only looked for in 5xx bodies, which must be INTERNAL_ERROR exactly.)
INTERNALS = re.compile(r'Traceback \(most recent call last\)|File "[^"]+\.py", line')


def problems(case, response) -> list[str]:
    """What is wrong with the response to case; empty when nothing is."""
    status, text = response.status_code, response.text
    kind = content_type(response)
    found = []
    if status >= 500:
        found.append(f"{status}: {text[:300]}")
        if _error_message(text) != INTERNAL_ERROR:
            found.append("a 5xx body other than the generic internal error")
    leaked = INTERNALS.search(text) if status >= 400 else None
    if leaked:
        found.append(f"an error body carrying exception internals ({leaked.group()!r}): {text[:300]}")
    if kind == "text/event-stream":
        found += _sse_problems(text)
    elif status == 200 and case.path == "/worker_generate_stream":
        found += _worker_stream_problems(text)
    elif case.path == "/metrics":
        pass  # Prometheus' text format
    elif kind != "application/json":
        found.append(f"content-type {kind!r}, not JSON")
    else:
        found += _json_problems(case, response, status)
    return found


def content_type(response) -> str:
    """The media type, without parameters (schemathesis' responses hold each header as a list)."""
    values = response.headers.get("content-type") or [""]
    return values[0].split(";")[0].strip()


def _json_problems(case, response, status: int) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return ["a body that is not JSON"]
    if status == 200 and case.path == "/worker_generate" and body.get("error_code") != 0:
        return [f"a worker answer carrying an error (FastChat's convention is a 200): {response.text[:300]}"]
    if status < 300 or status == 422:
        try:
            case.validate_response(response, checks=[response_schema_conformance])
        except AssertionError as failure:
            return [f"not the documented {status} shape: {str(failure)[:600]}"]
        return []
    if status >= 500:
        return []
    if KSERVE_PATHS.match(case.formatted_path):
        ok = isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
        return [] if ok else [f"not KServe's error shape: {response.text[:300]}"]
    error = body.get("error") if isinstance(body, dict) else None
    ok = (isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]
          and isinstance(error.get("type"), str) and {"param", "code"} <= error.keys())
    return [] if ok else [f"not the OpenAI error shape: {response.text[:300]}"]


def _sse_problems(text: str) -> list[str]:
    if text.startswith("event: "):
        return _responses_stream_problems(text)
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    if not events or events[-1] != "[DONE]":
        return [f"a stream that does not end with [DONE]: ...{text[-200:]!r}"]
    for event in events[:-1]:
        try:
            chunk = json.loads(event)
        except ValueError:
            return [f"a stream event that is not JSON: {event[:200]!r}"]
        if "error" in chunk:
            return [f"a stream that ended in an error: {event[:300]}"]
        if not isinstance(chunk.get("choices"), list):
            return [f"a stream chunk without choices: {event[:300]}"]
    return []


def _responses_stream_problems(text: str) -> list[str]:
    blocks = [block.split("\n") for block in text.split("\n\n") if block]
    for number, block in enumerate(blocks):
        if len(block) != 2 or not block[0].startswith("event: ") or not block[1].startswith("data: "):
            return [f"a Responses stream event that is not one event and one data line: {block!r:.300}"]
        try:
            event = json.loads(block[1].removeprefix("data: "))
        except ValueError:
            return [f"a Responses stream event that is not JSON: {block[1][:200]!r}"]
        if event.get("type") != block[0].removeprefix("event: ") or event.get("sequence_number") != number:
            return [f"a Responses stream event out of place or misnamed: {block!r:.300}"]
    last = blocks[-1][0].removeprefix("event: ") if blocks else None
    if last not in ("response.completed", "response.incomplete"):
        return [f"a Responses stream that does not end completed or incomplete: ...{text[-300:]!r}"]
    return []


def _worker_stream_problems(text: str) -> list[str]:
    pieces = [piece for piece in text.split("\0") if piece]
    if not pieces:
        return ["an empty worker stream"]
    for piece in pieces:
        try:
            output = json.loads(piece)
        except ValueError:
            return [f"a worker stream object that is not JSON: {piece[:200]!r}"]
        if output.get("error_code") != 0 or not isinstance(output.get("text"), str):
            return [f"a worker stream object with an error: {piece[:300]}"]
    if json.loads(pieces[-1]).get("finish_reason") not in ("stop", "length"):
        return [f"a worker stream whose last object has no finish_reason: {pieces[-1][:300]}"]
    return []


def _error_message(text: str) -> str | None:
    try:
        body = json.loads(text)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("message") if isinstance(error, dict) else error
