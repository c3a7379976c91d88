"""The model runner over the paged KV cache, with real transformers models of each architecture the product
names: greedy output through the engine core equals model.generate, with chunked prompts and preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from predictor.engine.core import EngineCore
from predictor.engine.cuda_graphs import graph_batch_sizes
from predictor.engine.model_inputs import ModelInputs, Placeholders
from predictor.engine.model_runner import ModelRunner
from predictor.engine.sampling_params import SamplingParams
from predictor.engine.sequence import Sequence

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=500)
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, intermediate_size=128, num_key_value_heads=2)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL, intermediate_size=128, num_key_value_heads=2)),
    "falcon-multi-query": lambda: FalconForCausalLM(FalconConfig(**SMALL, multi_query=True)),
    "falcon-grouped": lambda: FalconForCausalLM(
        FalconConfig(**SMALL, new_decoder_architecture=True, num_kv_heads=2)),
}
PROMPTS = [[1, 5, 9, 200, 3], [1, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], list(range(1, 40)), [3] * 20]
BLOCK = 16


def model_of(architecture: str):
    torch.manual_seed(0)
    return ARCHITECTURES[architecture]().eval()


def generate(model, prompt: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def serve_greedy(runner: ModelRunner, prompts, steps: int, num_blocks: int, max_prefill_tokens: int = 32,
                 async_scheduling: bool = False):
    if runner.cache is None or runner.cache.num_blocks != num_blocks:
        runner.allocate_kv_cache(num_blocks)
    core = EngineCore(runner, num_blocks=num_blocks, block_size=BLOCK, max_num_seqs=4,
                      max_prefill_tokens=max_prefill_tokens, max_model_len=128, async_scheduling=async_scheduling)
    seqs = [Sequence(i, p, SamplingParams(temperature=0, max_new_tokens=steps), frozenset())
            for i, p in enumerate(prompts)]
    for seq in seqs:
        core.add(seq)
    preempted = 0
    schedule = core.scheduler.schedule

    def counting_schedule():
        nonlocal preempted
        step = schedule()
        preempted += len(step.preempted)
        return step

    core.scheduler.schedule = counting_schedule
    while core.has_work:
        core.step()
    return [s.output_token_ids for s in seqs], preempted


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_batched_chunked_greedy_decode_equals_generate(architecture, async_scheduling):
    model = model_of(architecture)
    expected = [generate(model, p, 12) for p in PROMPTS]
    runner = ModelRunner(model, block_size=BLOCK, max_model_len=128)
    assert runner.paged == architecture.startswith(("llama", "mistral"))  # Falcon attends with its own code
    outputs, _ = serve_greedy(runner, PROMPTS, 12, num_blocks=64, max_prefill_tokens=16,
                              async_scheduling=async_scheduling)
    assert outputs == expected


def serve_in_turn(runner: ModelRunner, prompts, steps: int, num_blocks: int = 64, async_scheduling: bool = False):
    """Each prompt served to its end before the next arrives, through one core: later ones find the earlier ones'
    blocks in the prefix cache. Returns the outputs and how many prompt tokens each found cached."""
    runner.allocate_kv_cache(num_blocks)
    core = EngineCore(runner, num_blocks=num_blocks, block_size=BLOCK, max_num_seqs=4, max_prefill_tokens=32,
                      max_model_len=128, async_scheduling=async_scheduling)
    seqs = []
    for i, prompt in enumerate(prompts):
        seqs.append(Sequence(i, prompt, SamplingParams(temperature=0, max_new_tokens=steps), frozenset()))
        core.add(seqs[-1])
        while core.has_work:
            core.step()
    return [s.output_token_ids for s in seqs], [s.num_cached_tokens for s in seqs]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("architecture", ["llama", "falcon-grouped"])  # the paged path, and the masked one
@pytest.mark.parametrize("shared", [32, 37])  # a prefix that ends at a block boundary, and one that does not
def test_a_prefix_cache_hit_gives_the_tokens_a_miss_gives(architecture, shared, async_scheduling):
    model = model_of(architecture)
    prefix = [1 + (i * 37) % 499 for i in range(shared)]
    prompts = [prefix + [5, 6, 7], prefix + [8, 9], prefix + [11], prefix]  # a miss, then hits; the last one
    expected = [generate(model, p, 8) for p in prompts]  # is cached whole but its last token
    outputs, cached = serve_in_turn(ModelRunner(model, block_size=BLOCK, max_model_len=128), prompts, 8,
                                    async_scheduling=async_scheduling)
    assert outputs == expected
    assert cached == ([0, 32, 32, 16] if shared == 32 else [0, 32, 32, 32])


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preemption_under_a_small_cache_keeps_greedy_output(async_scheduling):
    model = model_of("llama")
    expected = [generate(model, p, 30) for p in PROMPTS]
    runner = ModelRunner(model, block_size=BLOCK, max_model_len=128)
    outputs, preempted = serve_greedy(runner, PROMPTS, 30, num_blocks=1 + 8, async_scheduling=async_scheduling)
    assert outputs == expected and preempted > 0


def test_model_inputs_round_trip_through_one_tensor():
    inputs = ModelInputs([5, 6, 7, 8], [0, 1, 2, 9], [17, 18, 19, 41], [3, 1], [3, 10], [[1], [2, 3]], [2, 3])
    again = ModelInputs.unpack(inputs.pack())
    assert again.token_ids == inputs.token_ids and again.slot_mapping == inputs.slot_mapping
    assert again.block_tables == [[1, 0], [2, 3]]  # padded to one width; the lengths bound what is read
    assert (again.num_prefills, again.num_decodes, again.query_starts) == (1, 1, [0, 3, 4])


def test_placeholders_take_the_previous_steps_tokens_and_a_failed_one_as_0():
    token_ids = torch.tensor([5, 0, 6, 0, 0])
    Placeholders([1, 3, 4], [2, 0, 1], torch.tensor([7, -1, 9])).fill(token_ids)
    assert token_ids.tolist() == [5, 9, 6, 7, 0]


def test_kv_cache_shape_is_what_the_model_caches():
    grouped = ModelRunner(model_of("falcon-grouped"), block_size=BLOCK, max_model_len=64)
    assert (grouped.kv_heads, grouped.head_dim) == (4, 16)  # transformers' Falcon caches keys broadcast to heads
    llama = ModelRunner(model_of("llama"), block_size=BLOCK, max_model_len=64)
    assert (llama.kv_heads, llama.head_dim) == (2, 16)
    assert llama.kv_bytes_per_block == 2 * 2 * 2 * 16 * 4 * BLOCK


def test_graph_buckets_cover_every_batch_size():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
