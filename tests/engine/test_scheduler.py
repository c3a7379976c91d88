"""The scheduler and block manager alone: pure policy over sequences and blocks, no model, no torch."""

from __future__ import annotations

import pytest

from predictor.engine.block_manager import BlockManager
from predictor.engine.sampling_params import SamplingParams
from predictor.engine.scheduler import Scheduler
from predictor.engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def sequence(seq_id: int, prompt_len: int) -> Sequence:
    """A prompt of its own: no two sequences share a prefix unless a test says so."""
    first = 1000 * (seq_id + 1)
    return Sequence(seq_id, list(range(first, first + prompt_len)), SamplingParams(max_new_tokens=64), frozenset())


def with_prompt(seq_id: int, prompt) -> Sequence:
    return Sequence(seq_id, list(prompt), SamplingParams(max_new_tokens=64), frozenset())


def scheduler(num_blocks: int, max_num_seqs: int = 8, max_prefill_tokens: int = 64, watermark: int = 0,
              caching: bool = True):
    return Scheduler(BlockManager(num_blocks, BLOCK, enable_caching=caching), max_num_seqs=max_num_seqs,
                     max_prefill_tokens=max_prefill_tokens, watermark_blocks=watermark)


def run_step(sched: Scheduler, token: int = 7):
    """What the engine core does with a step: mark the chunks computed, give sampling chunks a token."""
    step = sched.schedule()
    for chunk in step.chunks:
        chunk.seq.num_computed = chunk.end
        sched.blocks.mark_computed(chunk.seq, chunk.start, chunk.end)
        if chunk.samples:
            chunk.seq.output_token_ids.append(token)
    return step


def test_admits_by_free_blocks_and_keeps_first_come_first_served():
    sched = scheduler(num_blocks=1 + 4)  # 4 usable blocks = 16 tokens
    for seq_id, length in enumerate([8, 12, 2]):
        sched.add(sequence(seq_id, length))
    step = run_step(sched)
    assert [c.seq.id for c in step.chunks] == [0]  # 1 needs 3 more blocks, only 2 free: 2 may not overtake it
    assert [s.id for s in sched.waiting] == [1, 2]
    assert sched.blocks.num_free == 2


def test_max_num_seqs_bounds_the_batch():
    sched = scheduler(num_blocks=64, max_num_seqs=2)
    for seq_id in range(3):
        sched.add(sequence(seq_id, 3))
    assert [c.seq.id for c in run_step(sched).chunks] == [0, 1]
    assert [c.seq.id for c in run_step(sched).chunks] == [0, 1]  # decodes; 2 still waits for a row


def test_long_prompt_is_prefilled_in_chunks_while_others_decode():
    sched = scheduler(num_blocks=64, max_prefill_tokens=8)
    sched.add(sequence(0, 3))
    run_step(sched)  # 0's prompt
    sched.add(sequence(1, 20))
    sizes = []
    for _ in range(3):
        step = run_step(sched)
        sizes.append([(c.seq.id, c.num_tokens, c.samples) for c in step.chunks])
    assert sizes == [
        [(0, 1, True), (1, 8, False)],
        [(0, 1, True), (1, 8, False)],
        [(0, 1, True), (1, 4, True)],  # the last chunk samples 1's first token
    ]


def test_out_of_blocks_preempts_the_newest_which_resumes_later():
    sched = scheduler(num_blocks=1 + 3)  # 3 blocks = 12 tokens
    old, new = sequence(0, 4), sequence(1, 4)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both prompts, one block each; each sampled a token
    step = run_step(sched)  # both decodes need a second block: old takes the last free one
    assert [c.seq.id for c in step.chunks] == [0] and step.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.num_computed == 0 and new.block_table == []
    assert list(sched.waiting) == [new] and new.output_token_ids == [7]  # kept: recomputed from prompt + output
    sched.finish(old)
    step = run_step(sched)
    assert [(c.seq.id, c.start, c.end, c.samples) for c in step.chunks] == [(1, 4, 5, True)]  # its prompt's
    assert new.output_token_ids == [7, 7]  # block was still cached; its stream simply continues


def test_a_lone_sequence_out_of_blocks_preempts_itself_without_looping():
    sched = scheduler(num_blocks=1 + 1)
    seq = sequence(0, 4)
    sched.add(seq)
    run_step(sched)
    step = sched.schedule()  # needs a second block, there is none
    assert step.preempted == [seq] and step.chunks == []


def test_abort_frees_blocks_wherever_the_sequence_is():
    sched = scheduler(num_blocks=1 + 8)
    running, waiting = sequence(0, 8), sequence(1, 30)
    sched.add(running)
    sched.add(waiting)
    run_step(sched)
    assert sched.blocks.num_free == 6 and list(sched.waiting) == [waiting]
    assert sched.abort(running.id) is running and sched.blocks.num_free == 8
    assert sched.abort(waiting.id) is waiting and not sched.has_work
    assert sched.abort(99) is None


def test_out_of_order_finishes_return_their_blocks():
    sched = scheduler(num_blocks=1 + 12)
    seqs = [sequence(i, 4 * (i + 1)) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    run_step(sched)
    sched.finish(seqs[1])
    assert sched.blocks.num_free == 12 - 1 - 3
    assert [c.seq.id for c in run_step(sched).chunks] == [0, 2]
    sched.finish(seqs[0])
    sched.finish(seqs[2])
    assert sched.blocks.num_free == 12 and not sched.has_work


def test_watermark_keeps_blocks_free_for_running_decodes():
    sched = scheduler(num_blocks=1 + 4, watermark=3)
    sched.add(sequence(0, 4))
    sched.add(sequence(1, 4))
    step = run_step(sched)
    assert [c.seq.id for c in step.chunks] == [0]  # admitting 1 would leave fewer than 3 free blocks
    idle = scheduler(num_blocks=1 + 4, watermark=8)
    idle.add(sequence(0, 16))
    assert [c.seq.id for c in run_step(idle).chunks] == [0]  # an idle engine admits whatever fits


def test_preempted_sequences_go_before_new_arrivals():
    sched = scheduler(num_blocks=1 + 2)
    first, second, late = sequence(0, 4), sequence(1, 4), sequence(2, 1)
    sched.add(first)
    sched.add(second)
    run_step(sched)
    sched.add(late)
    step = run_step(sched)
    assert step.preempted == [second]
    assert list(sched.waiting) == [second, late]


@pytest.mark.parametrize("tokens, blocks", [(1, 1), (4, 1), (5, 2), (17, 5)])
def test_blocks_and_slots(tokens, blocks):
    manager = BlockManager(1 + 8, BLOCK)
    seq = sequence(0, tokens)
    manager.grow(seq, tokens)
    assert len(seq.block_table) == blocks and 0 not in seq.block_table  # block 0 is scratch
    slots = manager.slots(seq, 0, tokens)
    assert slots == [seq.block_table[p // BLOCK] * BLOCK + p % BLOCK for p in range(tokens)]
    manager.free(seq)
    assert manager.num_free == 8


# ---- prefix caching ---------------------------------------------------------------------------------------

PREFIX = list(range(100, 110))  # two full blocks and a half


def chunks_of(step) -> list[tuple[int, int, int]]:
    return [(c.seq.id, c.start, c.end) for c in step.chunks]


def test_a_shared_prefix_is_computed_once_and_its_full_blocks_shared():
    sched = scheduler(num_blocks=1 + 16)
    first = with_prompt(0, PREFIX + [1, 2])
    sched.add(first)
    run_step(sched)
    second = with_prompt(1, PREFIX + [3])
    sched.add(second)
    assert chunks_of(run_step(sched)) == [(0, 12, 13), (1, 8, 11)]  # its first two blocks were cached
    assert second.num_cached_tokens == 8 and first.num_cached_tokens == 0
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert [sched.blocks.block(b).ref_count for b in second.block_table] == [2, 2, 1]


def test_a_wholly_cached_prompt_recomputes_its_last_block_into_one_of_its_own():
    sched = scheduler(num_blocks=1 + 16)
    prompt = list(range(100, 108))  # exactly two blocks
    first = with_prompt(0, prompt)
    sched.add(first)
    run_step(sched)
    again = with_prompt(1, prompt)
    sched.add(again)
    step = run_step(sched)
    assert chunks_of(step)[-1] == (1, 4, 8) and step.chunks[-1].samples  # the last token's logits are needed
    assert again.block_table[0] == first.block_table[0] and again.block_table[1] != first.block_table[1]
    twin = sched.blocks.block(again.block_table[1])
    assert twin.ref_count == 1 and twin.hash is None  # first's block stays the cached one: this one is private


def test_sequences_sharing_a_prompt_wait_for_its_one_computation():
    sched = scheduler(num_blocks=1 + 32, max_prefill_tokens=8)
    siblings = [with_prompt(i, PREFIX + [1, 2, 3, 4, 5, 6]) for i in range(3)]  # 16 tokens: 4 blocks
    late = with_prompt(3, range(500, 504))
    for seq in (*siblings, late):
        sched.add(seq)
    assert chunks_of(run_step(sched)) == [(0, 0, 8)]  # the others wait for its blocks, and late behind them
    assert chunks_of(run_step(sched)) == [(0, 8, 16)]  # 1 would begin with blocks 0 is computing
    assert chunks_of(run_step(sched)) == [(0, 16, 17), (1, 12, 16), (2, 12, 16)]
    assert chunks_of(run_step(sched)) == [(0, 17, 18), (1, 16, 17), (2, 16, 17), (3, 0, 4)]
    shared = siblings[0].block_table[:3]
    assert all(s.block_table[:3] == shared for s in siblings)
    assert [sched.blocks.block(b).ref_count for b in shared] == [3, 3, 3]


def test_freed_blocks_stay_cached_and_are_taken_back():
    sched = scheduler(num_blocks=1 + 3)
    first = with_prompt(0, PREFIX)
    sched.add(first)
    run_step(sched)
    sched.finish(first)
    assert sched.blocks.num_free == 3
    second = with_prompt(1, PREFIX[:8] + [1, 2, 3, 4])  # needs 3 blocks; 2 of them are the free cached ones
    sched.add(second)
    assert chunks_of(run_step(sched)) == [(1, 8, 12)]
    assert sched.blocks.num_free == 0


def test_reviving_free_cached_blocks_counts_against_the_free_ones():
    sched = scheduler(num_blocks=1 + 4)
    first = with_prompt(0, PREFIX)
    sched.add(first)
    run_step(sched)
    sched.finish(first)
    hog = with_prompt(1, range(500, 504))
    sched.add(hog)
    run_step(sched)  # 3 free blocks left, 2 of them cached for PREFIX
    second = with_prompt(2, PREFIX[:8] + list(range(600, 608)))  # 2 cached blocks + 2 new: 4 > 3 free
    sched.add(second)
    assert chunks_of(run_step(sched)) == [(1, 4, 5)] and list(sched.waiting) == [second]
    sched.finish(hog)
    assert chunks_of(run_step(sched)) == [(2, 8, 16)]


def test_eviction_takes_blocks_with_nothing_cached_first_then_chains_from_their_tails():
    sched = scheduler(num_blocks=1 + 5)
    first = with_prompt(0, PREFIX[:9])  # two full blocks and one token
    sched.add(first)
    run_step(sched)
    head, tail, partial = first.block_table
    sched.finish(first)
    other = with_prompt(1, range(500, 516))  # four blocks: the two never used, the partial one, first's tail
    sched.add(other)
    run_step(sched)
    assert sorted(other.block_table) == sorted({1, 2, 3, 4, 5} - {head})
    assert partial in other.block_table and tail in other.block_table
    assert sched.blocks.lookup(with_prompt(2, PREFIX)).blocks == [head]  # the tail's hash went with it


def test_caching_off_computes_every_prompt():
    sched = scheduler(num_blocks=1 + 16, caching=False)
    for seq_id in range(2):
        sched.add(with_prompt(seq_id, PREFIX))
    assert chunks_of(run_step(sched)) == [(0, 0, 10), (1, 0, 10)]
    assert sched.running[1].num_cached_tokens == 0


def test_a_lookup_stops_before_the_last_token_even_when_its_block_hash_is_known():
    manager = BlockManager(1 + 8, BLOCK)
    first, second = with_prompt(0, PREFIX[:8]), with_prompt(1, PREFIX[:8])
    manager.grow(first, 8)
    manager.mark_computed(first, 0, 8)
    manager.grow(second, 8)  # hashes both its blocks (as a prefill chunk does), then is preempted before computing
    manager.free(second)
    assert manager.lookup(second).blocks == first.block_table[:1]
