"""Schemathesis over the running server's own /openapi.json: no request, schema-valid or not, reaches a 5xx;
every answer has its route's documented shape; the server serves normally afterwards.

Every operation in the document is fuzzed, KServe's V1 :predict and V2 /infer with the text bodies of
tests/server/fuzz_schemas.py (the document leaves them raw). Positive cases are generated from the schemas, negative
ones break them (wrong types, out-of-range values, missing fields); tests/server/fuzz_cases.py points both at the served
model and keeps generations short. FUZZ_EXAMPLES sets the cases per operation and mode; under CI the run is
derandomized (the same cases each time), elsewhere each run explores new ones.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

import httpx
import pytest
import schemathesis
from fuzz_cases import repaired, served
from fuzz_checks import content_type, problems
from fuzz_schemas import V1_PREDICT, V2_INFER, completed
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from models import TINY_LLAMA
from schemathesis import GenerationMode
from servers import metric, start, wait_for_metric

MAX_MODEL_LEN = 64
VOCAB_SIZE = TINY_LLAMA["vocab_size"]
MAX_STREAM_EVENTS = 10**6  # schemathesis hangs up on a stream after 20 events unless told; every stream is read whole
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                         suppress_health_check=list(HealthCheck), print_blob=True)
GENERATING = {"POST /openai/v1/completions", "POST /openai/v1/chat/completions", "POST /openai/v1/responses",
              "POST /generate", "POST /chat", "POST /worker_generate", "POST /worker_generate_stream",
              f"POST {V1_PREDICT}", f"POST {V2_INFER}"}


@pytest.fixture(scope="module")
def fuzzed(tiny_llama, tmp_path_factory):
    """A server whose every generation is short: max_model_len 64, 4 new tokens unless asked otherwise."""
    running = start(tiny_llama, tmp_path_factory.mktemp("logs") / "server.log", f"--max_model_len={MAX_MODEL_LEN}",
                    "--max_new_tokens=4", "--max_num_seqs=8", "--chat_template=llama-2")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api(fuzzed):
    document = completed(httpx.get(f"{fuzzed.url}/openapi.json", timeout=10).json())
    config = {"base-url": fuzzed.url, "max-stream-events": MAX_STREAM_EVENTS,
              "output": {"sanitization": {"enabled": False}}}  # else max_tokens reads "[Filtered]" (a "token")
    return schemathesis.openapi.from_dict(document, config=schemathesis.Config.from_dict(config))


@dataclass
class Run:
    """What one mode's fuzzing saw: statuses and stream answers per operation, and the failures."""

    statuses: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(
        collections.Counter))
    streamed: collections.Counter = field(default_factory=collections.Counter)
    failures: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return "\n".join(f"{label:60} {dict(counts)}" for label, counts in sorted(self.statuses.items()))


def fuzz(api, server, mode: GenerationMode) -> Run:
    run = Run()
    for result in api.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not (operation.body or operation.query or operation.headers):
            continue  # nothing to break: its only parameter is the model's name, which stays the served one
        try:
            fuzz_operation(run, operation, server, mode)
        except Unsatisfiable:
            pass  # no invalid value for what it takes (e.g. a query parameter that takes any string)
        except Exception as failure:  # noqa: BLE001 - every operation is fuzzed, then all failures are reported
            run.failures[operation.label] = f"{type(failure).__name__}: {failure}"[:3000]
    return run


def fuzz_operation(run: Run, operation, server, mode: GenerationMode) -> None:
    names = {parameter.name: server.model_name for parameter in operation.path_parameters}

    @FUZZ_SETTINGS
    @given(operation.as_strategy(generation_mode=mode, path_parameters=names))
    def one(case):
        body = served(case.body, server.model_name, MAX_MODEL_LEN)
        case.body = repaired(operation.path, body, VOCAB_SIZE) if mode is GenerationMode.POSITIVE else body
        response = case.call(timeout=60)
        run.statuses[operation.label][response.status_code] += 1
        streaming = content_type(response) == "text/event-stream" or operation.path.endswith("_stream")
        if response.status_code == 200 and streaming:
            run.streamed[operation.label] += 1
        found = problems(case, response)
        assert not found, "\n".join(found) + f"\n{case.as_curl_command()}"

    one()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda mode: mode.value)
def test_no_request_reaches_a_5xx_and_every_answer_has_its_documented_shape(api, fuzzed, mode):
    run = fuzz(api, fuzzed, mode)
    print(f"{mode.value}:\n{run.summary()}")
    assert not run.failures, "\n\n".join(f"{label}:\n{failure}" for label, failure in run.failures.items())
    assert {f"POST {V1_PREDICT}", f"POST {V2_INFER}"} <= run.statuses.keys()
    if mode is GenerationMode.POSITIVE:  # a fuzzer that only ever reached 400s would have tested little
        for label in GENERATING:
            assert run.statuses[label][200] > 0, f"no fuzzed {label} was served: {dict(run.statuses[label])}"
        assert run.streamed["POST /openai/v1/completions"] and run.streamed["POST /openai/v1/chat/completions"]


def test_the_server_serves_normally_after_the_fuzzing(fuzzed):
    assert fuzzed.process.poll() is None, "the server exited"
    body = {"model": fuzzed.model_name, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
    reply = httpx.post(f"{fuzzed.url}/openai/v1/completions", json=body, timeout=30)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3, reply.text
    assert httpx.get(f"{fuzzed.url}/v1/models/{fuzzed.model_name}", timeout=10).status_code == 200
    wait_for_metric(fuzzed, "predictor_num_requests_running", 0, timeout=30)
    assert metric(fuzzed, "predictor_num_requests_waiting") == 0
    assert metric(fuzzed, "predictor_kv_cache_usage_ratio") == 0
    log = fuzzed.output()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
