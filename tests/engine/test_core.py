"""The engine core's step (schedule → execute → sample → update) over a fake runner: no model, real sampler.

The fake runner's "model" makes the next token a function of the current token and its position, so a
sequence's text is fixed by its prompt: whatever the batch, chunking or preemption did, the outputs must match.
"""

from __future__ import annotations

import torch

from predictor.engine.core import EngineCore
from predictor.engine.model_inputs import ModelInputs
from predictor.engine.sampling_params import SamplingParams
from predictor.engine.sequence import Sequence

VOCAB = 50
EOS = 0


class FakeRunner:
    device = torch.device("cpu")
    vocab_size = VOCAB

    def __init__(self, nan_for_token: int | None = None):
        self.nan_for_token = nan_for_token
        self.steps: list[ModelInputs] = []

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        self.steps.append(inputs)
        logits = torch.zeros(len(inputs.sample_indices), VOCAB)
        for row, index in enumerate(inputs.sample_indices):
            token, position = inputs.token_ids[index], inputs.positions[index]
            logits[row, next_token(token, position)] = 10.0
            if token == self.nan_for_token:
                logits[row, 3] = float("nan")
        return logits


def next_token(token: int, position: int) -> int:
    return 1 + (token * 7 + position) % (VOCAB - 1)  # never EOS


def expected_output(prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(next_token(tokens[-1], len(tokens) - 1))
    return tokens[len(prompt):]


def core(num_blocks: int, runner=None, **overrides) -> EngineCore:
    settings = dict(block_size=4, max_num_seqs=8, max_prefill_tokens=16, max_model_len=64) | overrides
    return EngineCore(runner or FakeRunner(), num_blocks=num_blocks, **settings)


def request(seq_id: int, prompt: list[int], max_new_tokens: int = 12, **params) -> Sequence:
    return Sequence(seq_id, prompt, SamplingParams(temperature=0, max_new_tokens=max_new_tokens, **params),
                    frozenset({EOS}))


def run(engine: EngineCore, seqs: list[Sequence]) -> dict[int, tuple[list[int], str]]:
    for seq in seqs:
        engine.add(seq)
    finished = {}
    while engine.has_work:
        outputs, _ = engine.step()
        for out in outputs:
            if out.finish_reason:
                finished[out.seq.id] = (list(out.seq.output_token_ids), out.finish_reason)
    return finished


PROMPTS = [[5, 6, 7], [9] * 10, [11, 12], list(range(1, 30)), [4]]


def test_outputs_follow_the_model_through_batching_and_chunking():
    finished = run(core(num_blocks=200), [request(i, p) for i, p in enumerate(PROMPTS)])
    assert finished == {i: (expected_output(p, 12), "length") for i, p in enumerate(PROMPTS)}


def test_preemption_under_memory_pressure_changes_nothing_the_client_sees():
    runner = FakeRunner()
    engine = core(num_blocks=1 + 12, runner=runner)  # 48 tokens for 5 sequences that end at 15..41 tokens
    finished = run(engine, [request(i, p, max_new_tokens=12) for i, p in enumerate(PROMPTS)])
    assert finished == {i: (expected_output(p, 12), "length") for i, p in enumerate(PROMPTS)}
    assert engine.blocks.num_free == 12
    computed = sum(len(step.token_ids) for step in runner.steps)
    needed = sum(len(p) + 12 - 1 for p in PROMPTS)  # each token's keys once, but the last token's
    assert computed > needed  # preempted sequences were recomputed


def test_stop_token_and_max_model_len_finish():
    stop_at = expected_output([5], 3)[-1]
    engine = core(num_blocks=100, max_model_len=10)
    stopped = request(0, [5], stop_token_ids=[stop_at])
    stopped.stop_ids = frozenset({EOS, stop_at})
    finished = run(engine, [stopped, request(1, [1] * 8, max_new_tokens=2), request(2, [1] * 6, max_new_tokens=4)])
    assert finished[0] == (expected_output([5], 3), "stop")
    assert finished[1][1] == "length" and len(finished[1][0]) == 2
    assert finished[2][1] == "length" and len(finished[2][0]) == 4  # 6 + 4 = max_model_len


def test_abort_frees_blocks_and_the_sampler_row():
    engine = core(num_blocks=1 + 20)
    seqs = [request(i, [3 + i] * 8, max_new_tokens=30, repetition_penalty=1.5) for i in range(3)]  # unshared
    for seq in seqs:
        engine.add(seq)
    engine.step()
    engine.step()
    rows = sorted(seq.sampler_row for seq in seqs)
    free, held = engine.blocks.num_free, len(seqs[1].block_table)
    assert engine.abort(seqs[1].id) is seqs[1] and seqs[1].sampler_row is None
    assert held and engine.blocks.num_free == free + held
    late = request(9, [3] * 2)
    engine.add(late)
    engine.step()
    assert late.sampler_row in rows  # the freed row is reused


def test_nan_logits_fail_only_their_sequence():
    runner = FakeRunner(nan_for_token=6)  # the logits after token 6 hold a NaN: sequence 0's first step
    assert 6 not in [8, 9, 10, *expected_output([8, 9, 10], 12)]
    engine = core(num_blocks=100, runner=runner)
    for seq in (request(0, [5, 6]), request(1, [8, 9, 10])):
        engine.add(seq)
    errors, finished = {}, {}
    while engine.has_work:
        outputs, _ = engine.step()
        for out in outputs:
            if out.finish_reason:
                finished[out.seq.id] = out.finish_reason
                errors[out.seq.id] = out.error
    assert finished == {0: "error", 1: "length"}
    assert "NaN" in errors[0] and errors[1] is None
