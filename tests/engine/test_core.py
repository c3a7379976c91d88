"""The engine core's step (schedule → execute → sample → update) over a fake runner: no model, real sampler.

The fake runner's "model" makes the next token a function of the current token and its position, so a
sequence's text is fixed by its prompt: whatever the batch, chunking or preemption did, the outputs must match.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from predictor.engine.block_manager import BlockManager
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
        token_ids = device_token_ids(inputs)
        logits = torch.zeros(len(inputs.sample_indices), VOCAB)
        for row, index in enumerate(inputs.sample_indices):
            token, position = token_ids[index], inputs.positions[index]
            logits[row, next_token(token, position)] = 10.0
            if token == self.nan_for_token:
                logits[row, 3] = float("nan")
        return logits


def device_token_ids(inputs: ModelInputs) -> list[int]:
    """The step's token ids as the model sees them: async scheduling's placeholders filled in, as the runner does."""
    ids = torch.tensor(inputs.token_ids)
    if inputs.placeholders is not None:
        inputs.placeholders.fill(ids)
    return ids.tolist()


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


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    """Every core test runs with async scheduling off and on: what a client sees must not change."""
    return request.param


def test_outputs_follow_the_model_through_batching_and_chunking(async_scheduling):
    engine = core(num_blocks=200, async_scheduling=async_scheduling)
    finished = run(engine, [request(i, p) for i, p in enumerate(PROMPTS)])
    assert finished == {i: (expected_output(p, 12), "length") for i, p in enumerate(PROMPTS)}


def test_preemption_under_memory_pressure_changes_nothing_the_client_sees(async_scheduling):
    runner = FakeRunner()
    # 48 tokens for 5 sequences that end at 15..41 tokens
    engine = core(num_blocks=1 + 12, runner=runner, async_scheduling=async_scheduling)
    finished = run(engine, [request(i, p, max_new_tokens=12) for i, p in enumerate(PROMPTS)])
    assert finished == {i: (expected_output(p, 12), "length") for i, p in enumerate(PROMPTS)}
    assert engine.blocks.num_free == 12
    computed = sum(len(step.token_ids) for step in runner.steps)
    needed = sum(len(p) + 12 - 1 for p in PROMPTS)  # each token's keys once, but the last token's
    assert computed > needed  # preempted sequences were recomputed


def test_stop_token_and_max_model_len_finish(async_scheduling):
    stop_at = expected_output([5], 3)[-1]
    engine = core(num_blocks=100, max_model_len=10, async_scheduling=async_scheduling)
    stopped = request(0, [5], stop_token_ids=[stop_at])
    stopped.stop_ids = frozenset({EOS, stop_at})
    finished = run(engine, [stopped, request(1, [1] * 8, max_new_tokens=2), request(2, [1] * 6, max_new_tokens=4)])
    assert finished[0] == (expected_output([5], 3), "stop")
    assert finished[1][1] == "length" and len(finished[1][0]) == 2
    assert finished[2][1] == "length" and len(finished[2][0]) == 4  # 6 + 4 = max_model_len


def test_abort_frees_blocks_and_the_sampler_row(async_scheduling):
    engine = core(num_blocks=1 + 20, async_scheduling=async_scheduling)
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


def test_nan_logits_fail_only_their_sequence(async_scheduling):
    runner = FakeRunner(nan_for_token=6)  # the logits after token 6 hold a NaN: sequence 0's first step
    assert 6 not in [8, 9, 10, *expected_output([8, 9, 10], 12)]
    engine = core(num_blocks=100, runner=runner, async_scheduling=async_scheduling)
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


# ---- prefix caching: a fake model that reads its KV cache ---------------------------------------------------


class AttendingRunner(FakeRunner):
    """Keeps each token (and its position) in its KV slot and makes the next token a function of every token the
    sequence's block table holds: a block read with the wrong content, or overwritten while another sequence
    shares it, changes the output. `check` sees each step's inputs before they are written."""

    def __init__(self, block_size: int):
        super().__init__()
        self.block_size = block_size
        self.kv: dict[int, tuple[int, int]] = {}
        self.check = lambda inputs: None

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        self.check(inputs)
        self.steps.append(inputs)
        for token, position, slot in zip(device_token_ids(inputs), inputs.positions, inputs.slot_mapping,
                                         strict=True):
            self.kv[slot] = (token, position)
        size, starts, samples = self.block_size, inputs.query_starts, set(inputs.sample_indices)
        logits = torch.zeros(len(samples), VOCAB)
        rows = (s for s in range(len(inputs.seq_lens)) if starts[s + 1] - 1 in samples)
        for row, s in enumerate(rows):
            table = inputs.block_tables[s]
            context = [self.kv[table[p // size] * size + p % size] for p in range(inputs.seq_lens[s])]
            assert [position for _, position in context] == list(range(len(context)))
            logits[row, next_after([token for token, _ in context])] = 10.0
        return logits


def next_after(tokens: list[int]) -> int:
    return 1 + sum((i + 1) * t for i, t in enumerate(tokens)) % (VOCAB - 1)  # never EOS


def expected_after(prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(next_after(tokens))
    return tokens[len(prompt):]


def assert_writes_only_private_blocks(blocks: BlockManager, inputs: ModelInputs) -> None:
    for slot in inputs.slot_mapping:
        block = blocks.block(slot // blocks.block_size)
        assert block.ref_count == 1 and not block.computed, f"block {block.id} written while shared or cached"


def test_n_choices_compute_their_shared_prompt_once(async_scheduling):
    runner = AttendingRunner(block_size=4)
    engine = core(num_blocks=100, runner=runner, max_prefill_tokens=16, async_scheduling=async_scheduling)
    runner.check = lambda inputs: assert_writes_only_private_blocks(engine.blocks, inputs)
    prompt = list(range(1, 41))  # ten blocks, prefilled in three steps
    seqs = [request(i, prompt, max_new_tokens=3) for i in range(4)]
    finished = run(engine, seqs)
    assert finished == {i: (expected_after(prompt, 3), "length") for i in range(4)}
    assert [s.num_cached_tokens for s in seqs] == [0, 36, 36, 36]  # all but the block holding the last token
    prompt_tokens_computed = sum(p < len(prompt) for step in runner.steps for p in step.positions)
    assert prompt_tokens_computed == 40 + 3 * 4
    assert engine.blocks.num_free == 99


# A workload: (shared prefix, own suffix, max_new_tokens, arrival step, abort this many steps later or never,
# copies submitted together as the n choices of one request).
PREFIXES = [[], list(range(10, 19)), [*range(10, 17), 40, 41, 42, 43, 44], list(range(20, 36))]
REQUESTS = st.tuples(st.integers(0, len(PREFIXES) - 1), st.lists(st.integers(1, VOCAB - 1), max_size=6),
                     st.integers(1, 8), st.integers(0, 12), st.none() | st.integers(0, 12), st.integers(1, 3))


def serve_workload(workload, num_blocks: int, max_prefill_tokens: int, max_num_seqs: int,
                   async_scheduling: bool) -> dict:
    """Runs the workload, checking every step's writes; returns what happened, for the caller to check more."""
    runner = AttendingRunner(block_size=4)
    engine = core(num_blocks=num_blocks, runner=runner, max_prefill_tokens=max_prefill_tokens,
                  max_num_seqs=max_num_seqs, async_scheduling=async_scheduling)
    runner.check = lambda inputs: assert_writes_only_private_blocks(engine.blocks, inputs)
    preempted = 0
    schedule = engine.scheduler.schedule

    def counting_schedule():
        nonlocal preempted
        step = schedule()
        preempted += len(step.preempted)
        return step

    engine.scheduler.schedule = counting_schedule
    seqs, aborts = [], {}
    for prefix, suffix, max_new, arrival, abort_after, copies in workload:
        prompt = (PREFIXES[prefix] + suffix) or [1]
        for _ in range(copies):
            seqs.append((arrival, request(len(seqs), prompt, max_new_tokens=max_new)))
            if abort_after is not None:
                aborts[len(seqs) - 1] = arrival + abort_after
    step = 0
    while step <= 12 or engine.has_work:
        for arrival, seq in seqs:
            if arrival == step:
                engine.add(seq)
        for seq_id, at in aborts.items():
            if at == step:
                engine.abort(seq_id)
        engine.step()
        step += 1
        assert step < 1000
    for _, seq in seqs:
        expected = expected_after(seq.prompt_token_ids, seq.params.max_new_tokens)
        if seq.id in aborts:
            assert seq.output_token_ids == expected[: seq.num_generated]
        else:
            assert seq.output_token_ids == expected
    assert engine.blocks.num_free == num_blocks - 1
    assert all(engine.blocks.block(b).ref_count == 0 for b in range(num_blocks))
    return {"preempted": preempted, "cached": sum(seq.num_cached_tokens or 0 for _, seq in seqs)}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=st.lists(REQUESTS, min_size=1, max_size=10), num_blocks=st.integers(1 + 9, 1 + 24),
       max_prefill_tokens=st.sampled_from([4, 7, 16]), max_num_seqs=st.integers(1, 6))
def test_shared_blocks_are_never_written_and_outputs_follow_the_model(workload, num_blocks, max_prefill_tokens,
                                                                      max_num_seqs, async_scheduling):
    serve_workload(workload, num_blocks, max_prefill_tokens, max_num_seqs, async_scheduling)


def test_a_workload_with_shared_prefixes_hits_the_cache_under_preemption(async_scheduling):
    """The randomized test's checks, on a workload known to share blocks and preempt (so they are not vacuous)."""
    workload = [(3, [1, 2], 8, 0, None, 3), (1, [5], 8, 0, 3, 1), (2, [], 8, 1, None, 2), (3, [9, 9, 9], 8, 4, None, 1)]
    happened = serve_workload(workload, num_blocks=1 + 14, max_prefill_tokens=7, max_num_seqs=6,
                              async_scheduling=async_scheduling)
    assert happened["preempted"] > 0 and happened["cached"] > 0


# ---- async scheduling: one step in flight, its tokens pending ----------------------------------------------


def test_an_async_step_returns_the_previous_steps_tokens_and_computes_its_pending_ones_on_the_device():
    runner = FakeRunner()
    engine = core(num_blocks=100, runner=runner, async_scheduling=True)
    seq = request(0, [5, 6, 7], max_new_tokens=4)
    engine.add(seq)
    expected = expected_output([5, 6, 7], 4)
    outputs, started = engine.step()  # the prompt: its first token is drawn, not yet seen
    assert (outputs, started) == ([], [seq])
    assert seq.output_token_ids == [] and seq.num_pending == 1 and seq.num_tokens == 4 and engine.has_work
    for count in (1, 2, 3):
        outputs, _ = engine.step()  # the pending token is computed while the one before it is resolved
        assert [(o.token, o.finish_reason) for o in outputs] == [(expected[count - 1], None)]
        step = runner.steps[-1]
        assert step.token_ids == [0] and step.placeholders.indices == [0] and step.placeholders.sources == [0]
        assert seq.output_token_ids == expected[:count]
        assert seq.num_pending == (1 if count < 3 else 0)  # the 4th token ends it by length: nothing more to compute
    outputs, _ = engine.step()  # nothing to launch; the last step is resolved
    assert [(o.token, o.finish_reason) for o in outputs] == [(expected[3], "length")]
    assert not engine.has_work and len(runner.steps) == 4 and engine.blocks.num_free == 99


def test_a_stop_token_under_async_scheduling_wastes_one_row_and_nothing_else():
    stop_at = expected_output([5], 3)[-1]
    computed = {}
    for async_scheduling in (False, True):
        runner = FakeRunner()
        engine = core(num_blocks=100, runner=runner, async_scheduling=async_scheduling)
        stopped, other = request(0, [5], max_new_tokens=10), request(1, [8, 9], max_new_tokens=10)
        stopped.stop_ids = frozenset({EOS, stop_at})
        finished = run(engine, [stopped, other])
        assert finished == {0: (expected_output([5], 3), "stop"), 1: (expected_output([8, 9], 10), "length")}
        assert engine.blocks.num_free == 99 and engine.sampler._free_rows.__len__() == 8
        computed[async_scheduling] = sum(len(step.token_ids) for step in runner.steps)
    assert computed[True] == computed[False] + 1  # the row after the stop token, dropped


def test_blocks_that_pending_tokens_complete_are_cached_once_the_tokens_are_known(async_scheduling):
    runner = AttendingRunner(block_size=4)
    engine = core(num_blocks=100, runner=runner, async_scheduling=async_scheduling)
    runner.check = lambda inputs: assert_writes_only_private_blocks(engine.blocks, inputs)
    first = request(0, [5, 6, 7], max_new_tokens=14)  # 17 tokens: four full blocks, three of them of output
    run(engine, [first])
    follow_up = request(1, [5, 6, 7, *first.output_token_ids[:13]], max_new_tokens=3)  # 16 tokens: four blocks
    finished = run(engine, [follow_up])
    assert finished == {1: (expected_after(follow_up.prompt_token_ids, 3), "length")}
    assert follow_up.num_cached_tokens == 12  # all but the block holding its last token, output blocks included


def test_a_sequence_aborted_while_its_token_is_drawn_gets_nothing_more(async_scheduling):
    engine = core(num_blocks=1 + 20, async_scheduling=async_scheduling)
    kept, aborted = request(0, [3] * 6, max_new_tokens=6), request(1, [4] * 6, max_new_tokens=6)
    engine.add(kept)
    engine.add(aborted)
    engine.step()
    engine.step()
    assert engine.abort(aborted.id) is aborted and aborted.block_table == [] and aborted.sampler_row is None
    seen = []
    while engine.has_work:
        seen += [o.seq.id for o in engine.step()[0]]
    assert 1 not in seen and aborted.output_token_ids == expected_output([4] * 6, 6)[: aborted.num_generated]
    assert kept.output_token_ids == expected_output([3] * 6, 6) and engine.blocks.num_free == 20


class ScoringRunner(FakeRunner):
    """Soft logits over the whole vocabulary (EOS's fixed): penalties and min_new_tokens change what a greedy row
    picks, so that a count off by the pending token changes the output."""

    def __init__(self, eos_logit: float):
        super().__init__()
        self.eos_logit = eos_logit

    def execute(self, inputs: ModelInputs) -> torch.Tensor:
        self.steps.append(inputs)
        token_ids = device_token_ids(inputs)
        logits = torch.zeros(len(inputs.sample_indices), VOCAB)
        for row, index in enumerate(inputs.sample_indices):
            token, position = token_ids[index], inputs.positions[index]
            logits[row] = torch.tensor([((token * 7 + position + v * 13) % 17) / 4.0 for v in range(VOCAB)])
            logits[row, EOS] = self.eos_logit
        return logits


def test_seeded_sampling_draws_the_same_tokens_async():
    def sampled(async_scheduling: bool) -> dict:
        engine = core(num_blocks=100, runner=ScoringRunner(eos_logit=-10.0), async_scheduling=async_scheduling)
        seqs = [Sequence(i, p, SamplingParams(temperature=1.5, top_p=0.95, max_new_tokens=10, seed=7 + i),
                         frozenset({EOS})) for i, p in enumerate(PROMPTS)]
        return run(engine, seqs)

    assert sampled(True) == sampled(False)


@pytest.mark.parametrize("params, eos_logit", [(dict(frequency_penalty=0.6), -10.0),
                                               (dict(presence_penalty=1.0, repetition_penalty=1.3), -10.0),
                                               (dict(min_new_tokens=6), 10.0)])
def test_penalties_and_min_new_tokens_count_pending_tokens(params, eos_logit):
    prompts = [[5, 6, 7], [9] * 5, [11]]
    results = {}
    for async_scheduling in (False, True):
        engine = core(num_blocks=100, runner=ScoringRunner(eos_logit), async_scheduling=async_scheduling)
        results[async_scheduling] = run(engine, [request(i, p, max_new_tokens=10, **params)
                                                 for i, p in enumerate(prompts)])
    plain = run(core(num_blocks=100, runner=ScoringRunner(eos_logit)), [request(i, p, max_new_tokens=10)
                                                                         for i, p in enumerate(prompts)])
    assert all(results[True][i] != plain[i] for i in plain)  # the parameters matter to every sequence
    assert results[True] == results[False]


def test_a_sequence_preempted_while_its_stop_token_is_drawn_finishes_from_the_queue():
    """Four blocks of 4 tokens: at the fifth step the older sequence needs a third block and the newer one is
    preempted, while the token it drew the step before, its stop token, is still pending."""
    engine = core(num_blocks=1 + 4, async_scheduling=True)
    older, newer = request(0, [5, 6, 7, 8], max_new_tokens=8), request(1, [9, 10, 11, 12], max_new_tokens=8)
    drawn = expected_output(newer.prompt_token_ids, 5)
    assert drawn[-1] not in drawn[:-1]
    newer.stop_ids = frozenset({EOS, drawn[-1]})
    preempted = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        step = schedule()
        preempted.extend((seq.id, seq.num_pending) for seq in step.preempted)
        return step

    engine.scheduler.schedule = recording_schedule
    finished = run(engine, [older, newer])
    assert preempted == [(1, 1)]
    assert finished == {0: (expected_output(older.prompt_token_ids, 8), "length"), 1: (drawn, "stop")}
    assert not engine.scheduler.waiting and engine.blocks.num_free == 4


def test_logprobs_come_back_with_the_tokens_of_asynchronous_steps():
    def served(async_scheduling: bool):
        runner = ScoringRunner(eos_logit=-10.0)
        engine = core(num_blocks=100, runner=runner, async_scheduling=async_scheduling)
        seqs = [request(0, [5, 6, 7], max_new_tokens=4, logprobs=2), request(1, [9] * 5, max_new_tokens=10)]
        for seq in seqs:
            engine.add(seq)
        logprobs = []
        while engine.has_work:
            logprobs += [(o.seq.id, o.logprob) for o in engine.step()[0] if o.logprob is not None]
        return [s.output_token_ids for s in seqs], logprobs, runner.steps

    sync_tokens, sync_logprobs, _ = served(False)
    tokens, logprobs, steps = served(True)
    assert (tokens, logprobs) == (sync_tokens, sync_logprobs) and len(logprobs) == 4
    assert [bool(step.placeholders) for step in steps] == [False] + [True] * (len(steps) - 1)
