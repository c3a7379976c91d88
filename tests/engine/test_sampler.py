"""The batched sampler on real tensors: each processor, seeds, logprobs, and totality over every accepted value."""

from __future__ import annotations

import torch
import xgrammar as xgr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from predictor.engine.sampler import FAILED, GRAMMAR_DEAD_END, Sampler, row_argmax
from predictor.engine.sampling_params import SamplingParams
from predictor.engine.sequence import Sequence
from predictor.engine.structured_output import Grammars

VOCAB = 64
EOS = 2


def sequences(*params: dict, prompt=(5, 6), output=()) -> list[Sequence]:
    return [Sequence(i, list(prompt), SamplingParams(**p), frozenset({EOS}), output_token_ids=list(output))
            for i, p in enumerate(params)]


def sample(logits: torch.Tensor, seqs: list[Sequence], sampler: Sampler | None = None):
    sampler = sampler or Sampler(VOCAB, max_rows=16, device=torch.device("cpu"))
    for seq in seqs:
        if seq.sampler_row is None:
            sampler.add(seq)
    return sampler.sample(logits, seqs)


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = random_logits(3)
    out = sample(logits, sequences({"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 0}))
    assert out.tokens[0] == int(logits[0].argmax()) and out.tokens[2] == int(logits[2].argmax())


def test_top_k_1_and_tiny_top_p_pick_the_argmax():
    logits = random_logits(1)
    best = int(logits[0].argmax())
    for seed in range(5):
        assert sample(logits, sequences({"temperature": 1.5, "top_k": 1, "seed": seed})).tokens == [best]
        assert sample(logits, sequences({"temperature": 1.5, "top_p": 1e-6, "seed": seed})).tokens == [best]


def test_top_k_keeps_only_the_k_most_likely():
    logits = random_logits(1)
    allowed = set(logits[0].topk(3).indices.tolist())
    drawn = {sample(logits, sequences({"temperature": 5.0, "top_k": 3, "seed": s})).tokens[0] for s in range(40)}
    assert drawn <= allowed and len(drawn) > 1


def test_typical_p_keeps_the_token_closest_to_the_entropy():
    logits = torch.full((1, VOCAB), -20.0)
    logits[0, :4] = torch.tensor([4.0, 2.0, 1.9, -3.0])
    log_probs = torch.log_softmax(logits[0], -1)
    entropy = -(log_probs.exp() * log_probs).sum()
    typical = int((-log_probs - entropy).abs().argmin())
    picks = {sample(logits, sequences({"typical_p": 1e-6, "seed": s})).tokens[0] for s in range(10)}
    assert picks == {typical}


def test_min_new_tokens_bans_stop_tokens_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    assert sample(logits, sequences({"temperature": 0, "min_new_tokens": 3})).tokens != [EOS]
    assert sample(logits, sequences({"temperature": 0, "min_new_tokens": 3}, output=(9, 9, 9))).tokens == [EOS]


def test_penalties_demote_what_was_seen():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 7] = 3.0, 2.0  # 5 is in the prompt
    assert sample(logits, sequences({"temperature": 0, "repetition_penalty": 2.0})).tokens == [7]
    logits = torch.zeros(1, VOCAB)
    logits[0, 9], logits[0, 7] = 3.0, 2.0  # 9 was generated twice
    frequent = sequences({"temperature": 0, "frequency_penalty": 1.0}, output=(9, 9))
    assert sample(logits, frequent).tokens == [7]
    present = sequences({"temperature": 0, "presence_penalty": 0.5}, output=(9, 9))
    assert sample(logits, present).tokens == [9]  # 3 - 0.5 still beats 2


def test_generated_tokens_count_towards_penalties_step_by_step():
    sampler = Sampler(VOCAB, max_rows=4, device=torch.device("cpu"))
    (seq,) = sequences({"temperature": 0, "frequency_penalty": 2.0}, prompt=(1,))
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11] = 3.0, 2.0
    first = sample(logits, [seq], sampler).tokens[0]
    seq.output_token_ids.append(first)
    second = sample(logits, [seq], sampler).tokens[0]
    assert (first, second) == (10, 11)


def test_a_seed_decides_the_draw_whatever_else_is_in_the_batch():
    logits = random_logits(4, seed=3)
    alone = sample(logits[1:2], sequences({"temperature": 1.0, "seed": 42})).tokens
    mixed = sequences({"temperature": 0.7}, {"temperature": 1.0, "seed": 42}, {"temperature": 0},
                      {"temperature": 1.2, "top_p": 0.5, "typical_p": 0.9, "seed": 1})
    assert sample(logits, mixed).tokens[1] == alone[0]


def test_logprobs_are_the_models_own_distribution():
    logits = random_logits(2)
    out = sample(logits, sequences({"temperature": 0, "logprobs": 3}, {"temperature": 0}))
    log_probs = torch.log_softmax(logits[0], -1)
    first = out.logprobs[0]
    assert first.token_id == out.tokens[0] and abs(first.logprob - float(log_probs[out.tokens[0]])) < 1e-5
    assert [t for t, _ in first.top] == log_probs.topk(3).indices.tolist() and out.logprobs[1] is None


def test_a_row_of_nan_fails_alone():
    logits = random_logits(3)
    logits[1, 4] = float("nan")
    out = sample(logits, sequences({"temperature": 0}, {"temperature": 0}, {"temperature": 1.0, "seed": 1}))
    assert out.tokens[1] == FAILED and out.tokens[0] == int(logits[0].argmax()) and 0 <= out.tokens[2] < VOCAB


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.sampled_from([512, 513, 640, 1000, 32000, 32001]),
       kind=st.sampled_from(["normal", "ties", "last column", "nan", "-inf"]), seed=st.integers(0, 2**16))
def test_row_argmax_is_argmax_first_maximum_included(rows, vocab, kind, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, vocab, generator=generator)
    if kind == "ties":  # few distinct values: maxima repeat across and within blocks
        scores = torch.randint(-2, 2, (rows, vocab), generator=generator).float()
    elif kind == "last column":
        scores[:, -1] = scores.max() + 1
    elif kind == "nan":
        scores[0, vocab // 3] = scores[0, vocab // 2] = float("nan")
    elif kind == "-inf":
        scores[0] = float("-inf")
    assert torch.equal(row_argmax(scores), scores.argmax(dim=-1))


extreme_floats = st.one_of(st.sampled_from([5e-324, 1e-300, 1e-45, 1e-38, 1e-7]), st.floats(1e-300, 1.0))
accepted_params = st.fixed_dictionaries({
    "temperature": st.one_of(st.just(0.0), extreme_floats, st.floats(0.0, 100.0)),
    "top_p": extreme_floats,
    "top_k": st.integers(0, 2 * VOCAB),
    "typical_p": extreme_floats,
    "repetition_penalty": st.one_of(extreme_floats, st.floats(1e-300, 100.0)),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "min_new_tokens": st.integers(0, 3),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
})
model_logits = st.sampled_from(["normal", "huge", "flat", "with -inf", "with +inf"])


def logits_of(kind: str, rows: int) -> torch.Tensor:
    logits = random_logits(rows, seed=rows)
    if kind == "huge":
        logits *= 1e30
    elif kind == "flat":
        logits.zero_()
    elif kind == "with -inf":
        logits[:, ::2] = float("-inf")
    elif kind == "with +inf":
        logits[:, 3] = float("inf")
    return logits


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=accepted_params, kind=model_logits, output=st.lists(st.integers(0, VOCAB - 1), max_size=4))
def test_every_accepted_parameter_value_yields_a_valid_token_beside_normal_rows(params, kind, output):
    seqs = sequences({"temperature": 0}, params, {"temperature": 0.8, "top_p": 0.9, "seed": 3}, output=output)
    logits = logits_of(kind, 3)
    out = sample(logits, seqs)
    assert all(0 <= token < VOCAB for token in out.tokens)
    if kind in ("normal", "huge", "flat"):
        assert out.tokens[0] == int(logits[0].argmax())
    if params["logprobs"] is not None:
        assert out.logprobs[1] is not None and out.logprobs[1].token_id == out.tokens[1]


JSON_VOCAB = ["{", "}", "</s>", '"', ": ", ", ", "[", "]", "true", "false", "null", *"abcdefghijklmnopqrstuvwxyz",
              *"0123456789", *(f"x{i}" for i in range(17))]
assert len(JSON_VOCAB) == VOCAB


def allowed_tokens(grammar) -> set[int]:
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    grammar.matcher([]).fill(bitmask, 0)
    return {t for t in range(VOCAB) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=accepted_params, kind=model_logits)
def test_a_grammar_row_draws_only_what_its_grammar_allows_beside_free_rows(params, kind):
    grammar = Grammars(xgr.TokenizerInfo(JSON_VOCAB, stop_token_ids=[EOS]), [EOS]).compile({"type": "object"}, "f")
    seqs = sequences({"temperature": 0}, params, {"temperature": 0.8, "top_p": 0.9, "seed": 3})
    seqs[1].grammar = grammar
    logits = logits_of(kind, 3)
    out = sample(logits, seqs)
    allowed = allowed_tokens(grammar)
    if all(logits[1, t] == float("-inf") for t in allowed):
        assert out.tokens[1] == FAILED and seqs[1].error == GRAMMAR_DEAD_END
    else:
        assert out.tokens[1] in allowed
    if kind in ("normal", "huge", "flat"):
        assert out.tokens[0] == int(logits[0].argmax())
    if params["logprobs"] is not None and out.tokens[1] != FAILED:  # the model's own, before the mask
        assert out.logprobs[1].token_id == out.tokens[1]
        if kind == "normal":
            assert abs(out.logprobs[1].logprob - float(torch.log_softmax(logits[1], -1)[out.tokens[1]])) < 1e-4
