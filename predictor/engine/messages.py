"""The typed boundary between the engine's front (predictor/engine/engine.py, in the HTTP process) and its core
loop (predictor/engine/core_loop.py, in a process of its own): requests in, one message of outputs per step out.

Plain slotted dataclasses of ints, strings, lists and tuples, so that pickling them is cheap (a 64-sequence
step's outputs cross the pipe in well under a millisecond, see predictor/engine/core_client.py). Grammars cross
as their schema's text, not compiled: xgrammar's serialized form of a large grammar is hundreds of megabytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from predictor.engine.sampling_params import SamplingParams, TokenLogprob

# ---- front -> core ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class AddRequest:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    json_schema: str | None = None  # structured output's schema, as structured_output.schema_text wrote it


@dataclass(slots=True)
class Abort:
    id: int


@dataclass(slots=True)
class EmbedRequest:
    id: int
    prompts: list[list[int]]


@dataclass(slots=True)
class CancelEmbed:
    id: int  # the client left: prompts not yet computed are dropped


@dataclass(slots=True)
class EndAll:
    """Shutdown's grace period is over: end every queued and running request now."""

    error: str


@dataclass(slots=True)
class CompileGrammar:
    """Compile a schema on the core's grammar threads (a large one takes seconds, and steps go on meanwhile), so
    that the request that follows finds it in the compiler's cache; answered with GrammarCompiled."""

    id: int
    json_schema: str
    field: str


@dataclass(slots=True)
class CheckDevice:
    id: int


@dataclass(slots=True)
class Stop:
    pass


# ---- core -> front ------------------------------------------------------------------------------------------


# (request id, token ids shown, tokens generated so far, finish reason, error, logprobs)
SequenceEvent = tuple[int, list[int], int, str | None, str | None, list[TokenLogprob] | None]


@dataclass(slots=True)
class StepOutput:
    """Everything one pass of the core loop has to say (a step, or the inbox it applied between steps)."""

    events: list[SequenceEvent] = field(default_factory=list)
    # requests that left the queue: (id, prompt tokens the prefix cache held), None if cancelled while waiting;
    # applied before events, so a stream knows its cached tokens by its first token
    admitted: list[tuple[int, int | None]] = field(default_factory=list)
    embedded: list[tuple[str, int]] = field(default_factory=list)  # (outcome "computed"/"cancelled", prompts)
    embeddings_done: list[tuple[int, list[list[float]]]] = field(default_factory=list)  # (job id, vectors)
    running: int = 0
    preempted: int = 0  # waiting again after a preemption
    kv_cache_usage: float = 0.0


@dataclass(slots=True)
class DeviceChecked:
    id: int
    error: str | None


@dataclass(slots=True)
class GrammarCompiled:
    id: int
    error: str | None  # why xgrammar cannot use the schema (InvalidRequest's detail)


@dataclass(slots=True)
class CoreFailed:
    """The core loop ended on an error (the device, a tensor-parallel rank): every request ends with it."""

    error: str


@dataclass(slots=True)
class CoreReady:
    """The core process loaded the model and serves; what the front needs to know of it."""

    model_dir: str  # where the tokenizer is (the demo model's is made by the core)
    eos_token_ids: list[int]
    vocab_size: int
    hidden_size: int
    max_model_len: int
    structured_output: bool  # xgrammar can read the tokenizer


@dataclass(slots=True)
class LoadFailed:
    message: str  # one line, printed as "llm-predictor: <message>"
    exit_code: int  # 2: the model cannot be served as configured; 1: anything else
