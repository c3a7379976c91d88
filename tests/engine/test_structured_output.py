"""Structured output in the engine core over a fake model and a small character vocabulary: constrained rows follow
their JSON schema while free rows in the same steps follow the model, through preemption, seeds and dead ends.

The fake model's logits are pseudo-random per (token, position), so a free row's greedy text is fixed by its
prompt and is not JSON; a constrained row's text must parse and validate whatever the model prefers.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch
import xgrammar as xgr

from predictor.engine import Engine, Finished
from predictor.engine.core import EngineCore
from predictor.engine.core_client import ThreadCore
from predictor.engine.errors import InvalidRequest
from predictor.engine.json_closing import StringState, way_to_finish
from predictor.engine.model_inputs import ModelInputs
from predictor.engine.sampler import GRAMMAR_DEAD_END
from predictor.engine.sampling_params import SamplingParams, StructuredOutput
from predictor.engine.sequence import Sequence
from predictor.engine.structured_output import ANY_JSON_OBJECT, Grammars, keep_only

from .test_core import device_token_ids, run

EOS = 0
VOCAB = ["</s>", "{", "}", '"', ":", ",", " ", "[", "]", ": ", ", ", "true", "false", "null", '{"', '": ', '", "',
         "-", ".", "\n", "\t", "}}", "]]", *"abcdefghijklmnopqrstuvwxyz", *"0123456789"]
V = len(VOCAB)
REPLY = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9}},
         "required": ["ok", "n"], "additionalProperties": False}


def model_scores(token: int, position: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(token * 1000 + position)) * 3


class FakeRunner:
    device = torch.device("cpu")
    vocab_size = V

    def __init__(self, dead_row_token: int | None = None):
        self.steps: list[ModelInputs] = []
        self.dead_row_token = dead_row_token  # after this token, only "a" is possible: no JSON can continue

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        self.steps.append(inputs)
        token_ids = device_token_ids(inputs)
        rows = []
        for index in inputs.sample_indices:
            token, position = token_ids[index], inputs.positions[index]
            scores = model_scores(token, position)
            if token == self.dead_row_token:
                scores = torch.full((V,), float("-inf"))
                scores[VOCAB.index("a")] = 0.0
            rows.append(scores)
        return torch.stack(rows)


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    return Grammars(xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS]), [EOS])


def free_greedy(prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(model_scores(tokens[-1], len(tokens) - 1).argmax()))
        if tokens[-1] == EOS:
            break
    return tokens[len(prompt):]


def core(runner=None, num_blocks: int = 200, async_scheduling: bool = False) -> EngineCore:
    return EngineCore(runner or FakeRunner(), num_blocks=num_blocks, block_size=4, max_num_seqs=8,
                      max_prefill_tokens=64, max_model_len=128, async_scheduling=async_scheduling)


def request(seq_id: int, prompt: list[int], grammars: Grammars | None = None, schema: dict | None = None,
            **params) -> Sequence:
    params = {"temperature": 0, "max_new_tokens": 40, **params}
    grammar = None
    if schema is not None:
        params["structured_output"] = StructuredOutput(json_schema=schema)
        grammar = grammars.compile(schema, "structured_output")
    return Sequence(seq_id, prompt, SamplingParams(**params), frozenset({EOS}), grammar=grammar)


def text(tokens: list[int]) -> str:
    return "".join(VOCAB[t] for t in tokens if t != EOS)


PROMPTS = [[30, 31, 32], [40] * 6, [33, 34], [35], [36, 37, 38, 39]]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])  # async: synchronous steps
def test_constrained_rows_follow_their_schema_beside_free_rows_in_the_same_steps(grammars, async_scheduling):
    runner = FakeRunner()
    seqs = [request(0, PROMPTS[0], grammars, REPLY), request(1, PROMPTS[1]), request(2, PROMPTS[2], grammars, REPLY),
            request(3, PROMPTS[3]), request(4, PROMPTS[4], grammars, ANY_JSON_OBJECT, max_new_tokens=60)]
    finished = run(core(runner, async_scheduling=async_scheduling), seqs)
    for i in (0, 2):
        tokens, reason = finished[i]
        assert reason == "stop" and tokens[-1] == EOS
        jsonschema.validate(json.loads(text(tokens)), REPLY)
    for i in (1, 3):
        assert finished[i][0] == free_greedy(PROMPTS[i], 40)
        assert text(finished[i][0]) != text(finished[0][0])
    tokens, reason = finished[4]
    assert reason == "stop" and isinstance(json.loads(text(tokens)), dict)
    decodes = [step for step in runner.steps if len(step.sample_indices) == len(PROMPTS)]
    assert decodes, "constrained and free rows were never sampled in one step"
    # a step with a constrained row is resolved at once; the free rows' steps after the last one are not
    assert any(step.placeholders for step in runner.steps) == async_scheduling
    assert not any(step.placeholders for step in decodes)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preemption_resumes_each_grammar_where_it_was(grammars, async_scheduling):
    def fresh():
        return [request(i, p, grammars, REPLY if i % 2 == 0 else None) for i, p in enumerate(PROMPTS)]

    roomy = run(core(num_blocks=200), fresh())
    runner = FakeRunner()
    # 48 tokens for 5 sequences of 14..40 tokens
    tight = run(core(runner, num_blocks=1 + 12, async_scheduling=async_scheduling), fresh())
    assert tight == roomy
    computed = sum(len(step.token_ids) for step in runner.steps)
    assert computed > sum(len(p) + len(roomy[i][0]) - 1 for i, p in enumerate(PROMPTS))  # some were recomputed


def test_seeded_constrained_samples_repeat_and_differ_by_seed(grammars):
    def sampled(seed: int) -> str:
        seq = request(0, PROMPTS[0], grammars, REPLY, temperature=1.0, seed=seed)
        tokens, reason = run(core(), [seq])[0]
        assert reason == "stop"
        jsonschema.validate(json.loads(text(tokens)), REPLY)
        return text(tokens)

    assert sampled(3) == sampled(3)
    assert len({sampled(seed) for seed in range(8)}) > 1


def test_a_complete_json_ends_despite_min_new_tokens_and_ignore_eos(grammars):
    finished = run(core(), [request(0, PROMPTS[0], grammars, REPLY, min_new_tokens=30),
                            request(1, PROMPTS[2], grammars, REPLY, ignore_eos=True)])
    for tokens, reason in finished.values():
        assert reason == "stop" and len(tokens) < 30
        jsonschema.validate(json.loads(text(tokens)), REPLY)


def test_a_row_the_grammar_leaves_no_possible_token_fails_alone(grammars):
    runner = FakeRunner(dead_row_token=35)  # the logits after prompt [35] allow only "a", which JSON cannot start with
    engine = core(runner)
    seqs = [request(0, [35], grammars, REPLY), request(1, PROMPTS[0])]
    for seq in seqs:
        engine.add(seq)
    results = {}
    while engine.has_work:
        outputs, _ = engine.step()
        results |= {o.seq.id: (o.finish_reason, o.error) for o in outputs if o.finish_reason}
    assert results[0] == ("error", GRAMMAR_DEAD_END)
    assert results[1] == ("stop" if free_greedy(PROMPTS[0], 40)[-1] == EOS else "length", None)
    assert engine.sampler._free_rows and seqs[0].matcher is None


def test_a_schema_xgrammar_cannot_use_is_refused_naming_the_field(grammars):
    with pytest.raises(InvalidRequest, match=r"^response_format: unusable JSON schema: .*objectx") as err:
        grammars.compile({"type": "objectx"}, "response_format")
    assert err.value.field == "response_format" and ".cc:" not in str(err.value)


# ---- finishing within the token budget ------------------------------------------------------------------------

LETTERS = [VOCAB.index(c) for c in "abcdefghijklmnopqrstuvwxyz"]
QUOTES = [i for i, piece in enumerate(VOCAB) if '"' in piece]
ANSWER = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}
NESTED = {"type": "object", "properties": {"name": {"type": "string"},
                                           "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                                           "inner": {"type": "object", "properties": {"note": {"type": "string"}},
                                                     "required": ["note"]},
                                           "count": {"type": "integer"}, "color": {"enum": ["red", "green"]}},
          "required": ["name", "tags", "inner", "count", "color"]}


class Rambler(FakeRunner):
    """A model that never wants to end a string: letters outscore everything, quotes score least (a lone quote,
    to open a string, a little less so)."""

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        scores = super().execute(inputs)
        scores[:, LETTERS] += 20.0
        scores[:, QUOTES] -= 30.0
        scores[:, VOCAB.index('"')] += 10.0
        return scores


@pytest.mark.parametrize("schema, max_new_tokens", [(ANY_JSON_OBJECT, 24), (ANY_JSON_OBJECT, 64), (ANSWER, 24),
                                                    (ANSWER, 64), (NESTED, 100)],
                         ids=["json_object-24", "json_object-64", "answer-24", "answer-64", "nested-100"])
def test_a_model_that_never_closes_a_string_still_finishes_its_json_within_max_tokens(grammars, schema,
                                                                                      max_new_tokens):
    seqs = [request(0, PROMPTS[0], grammars, schema, max_new_tokens=max_new_tokens)]
    seqs += [request(1 + seed, PROMPTS[1], grammars, schema, max_new_tokens=max_new_tokens, temperature=1.0,
                     seed=seed) for seed in range(4)]
    for tokens, reason in run(core(Rambler()), seqs).values():
        assert reason == "stop" and len(tokens) <= max_new_tokens and tokens[-1] == EOS
        document = json.loads(text(tokens))
        jsonschema.validate(document, schema)
        if schema is not ANY_JSON_OBJECT:  # where the model may end the JSON early by itself
            assert len(tokens) > max_new_tokens - 16, "closing began long before it had to"


def test_a_json_that_cannot_fit_its_budget_ends_at_length_and_nothing_breaks(grammars):
    """NESTED's shortest JSON takes some 60 of these tokens."""
    (tokens, reason), = run(core(Rambler()), [request(0, PROMPTS[0], grammars, NESTED, max_new_tokens=40)]).values()
    assert reason == "length" and len(tokens) == 40


def test_closing_resumes_where_it_was_after_preemption(grammars):
    def fresh():
        return [request(i, p, grammars, (ANSWER, ANY_JSON_OBJECT)[i % 2], max_new_tokens=20 + 4 * i, temperature=1.0,
                        seed=i)
                for i, p in enumerate(PROMPTS)]

    roomy = run(core(Rambler(), num_blocks=200), fresh())
    runner = Rambler()
    tight = run(core(runner, num_blocks=1 + 12), fresh())
    assert tight == roomy and all(reason == "stop" for _, reason in roomy.values())
    computed = sum(len(step.token_ids) for step in runner.steps)
    assert computed > sum(len(p) + len(roomy[i][0]) - 1 for i, p in enumerate(PROMPTS))  # some were recomputed


DOCUMENTS = [(NESTED, {"name": 'a "q" b', "tags": ["x", "yz"], "inner": {"note": "n"}, "count": -12, "color": "green"}),
             (ANY_JSON_OBJECT, {"a": [1, {"b": None}, "c\\d"], "e": {"f": [True, 2.5e-3]}}),
             (REPLY, {"ok": False, "n": 7})]


@pytest.mark.parametrize("schema, document", DOCUMENTS, ids=["nested", "json_object", "reply"])
def test_the_way_to_finish_completes_every_prefix_into_valid_json(schema, document):
    """From any point of a valid output, the way found completes it into JSON that matches the schema."""
    tokenizer = xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    compiled = xgr.GrammarCompiler(tokenizer).compile_json_schema(json.dumps(schema), any_whitespace=False)
    full = json.dumps(document, separators=(", ", ": "))
    for end in range(len(full)):
        matcher, state = xgr.GrammarMatcher(compiled), StringState()
        assert matcher.accept_string(full[:end])
        state.feed(full[:end].encode())
        way = way_to_finish(matcher, state)
        jsonschema.validate(json.loads(full[:end] + way.decode()), schema)
        assert not matcher.is_completed() or way == b""  # the matcher itself is untouched


def test_the_way_to_finish_completes_a_character_a_byte_token_began():
    """Byte-fallback tokens spell a character a byte at a time; a way found between them finishes it first."""
    tokenizer = xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    compiled = xgr.GrammarCompiler(tokenizer).compile_json_schema(json.dumps(ANSWER), any_whitespace=False)
    for begun in (b"\xf3", b"\xf3\x8c", b"\xe2", b"\xc3"):
        matcher, state = xgr.GrammarMatcher(compiled), StringState()
        prefix = b'{"answer": "ab' + begun
        assert matcher.accept_string(prefix)
        state.feed(prefix)
        way = way_to_finish(matcher, state)
        jsonschema.validate(json.loads((prefix + way).decode()), ANSWER)


def test_keep_only_narrows_a_row_to_the_tokens_it_allowed():
    bitmask = xgr.allocate_token_bitmask(2, 100)  # every bit set: every token allowed
    bitmask[1, 0] = 0b1010  # row 1 allows only tokens 1 and 3 of the first word
    keep_only(bitmask, 0, [31, 63, 5, 99])  # bit 31 is an int32 word's sign bit
    keep_only(bitmask, 1, [3, 2, 40])
    allowed = [[t for t in range(100) if (int(bitmask[r, t >> 5]) >> (t & 31)) & 1] for r in range(2)]
    assert allowed == [[5, 31, 63, 99], [3, 40]]
    keep_only(bitmask, 1, [2])  # none of them allowed: the row stays as it was
    keep_only(bitmask, 1, None)
    assert [t for t in range(100) if (int(bitmask[1, t >> 5]) >> (t & 31)) & 1] == allowed[1]


class Spelled:
    """Enough of a tokenizer for the streams' detokenizer."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return text(ids)


def test_through_the_engine_front_grammars_compile_on_the_core_s_threads(grammars):
    """The front sends the schema's text; the core loop compiles it off its step loop and adds the request once
    compiled: the same tokens as a grammar handed to the core directly. A schema xgrammar refuses is an
    InvalidRequest naming the field when compiled first (the routes do), and ends its stream with an error when
    a request skipped that; a request aborted while its grammar compiles is cancelled."""
    engine = Engine(ThreadCore(core(), grammars), Spelled(), max_model_len=128, max_queue=8, eos_token_ids={EOS},
                    max_schema_bytes=1 << 15)
    engine.start()
    wanted = run(core(), [request(0, PROMPTS[0], grammars, REPLY)])[0]
    reply = SamplingParams(temperature=0, max_new_tokens=40, structured_output=StructuredOutput(json_schema=REPLY))
    unusable = SamplingParams(temperature=0, max_new_tokens=4,
                              structured_output=StructuredOutput(json_schema={"type": "objectx"}))

    async def events(stream) -> tuple[list[int], Finished]:
        tokens = []
        async for event in stream:
            if isinstance(event, Finished):
                return tokens, event
            tokens += event.token_ids

    async def scenario() -> None:
        await engine.compile_grammar(reply, "response_format")
        tokens, finished = await events(engine.submit(PROMPTS[0], reply))
        assert (tokens, finished.finish_reason) == (wanted[0][:-1], wanted[1])  # EOS ends it, not shown
        with pytest.raises(InvalidRequest, match=r'^response_format: unusable JSON schema: .*"objectx"'):
            await engine.compile_grammar(unusable, "response_format")
        _, refused = await events(engine.submit(PROMPTS[1], unusable))
        assert refused.finish_reason == "error" and refused.error.startswith("unusable JSON schema")
        slow = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(300)}}
        compiling = engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=8,
                                                             structured_output=StructuredOutput(json_schema=slow)))
        compiling.cancel()
        assert (await events(compiling))[1].finish_reason == "cancelled"
        async with asyncio.timeout(10):
            await engine.drained()
        assert engine.stats["waiting"] == 0

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()
