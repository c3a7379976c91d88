"""Decode attention over the paged cache: the per-sequence loop (CPU without its kernel) equals the batched gather
(CUDA without Triton), alone and inside a model's forward; tests/engine/test_triton_attention.py and
test_cpu_decode_attention.py hold the kernels to SDPA."""

from __future__ import annotations

import pytest
import torch

from predictor.engine.attention import AttentionMetadata, chunked_attention, decode_attention_gathered
from predictor.engine.cascade_attention import cascade_decode_attention, plan_cascade
from predictor.engine.model_runner import ModelRunner

from .test_model_runner import PROMPTS, generate, model_of, serve_greedy


def test_decodes_one_by_one_equal_the_batched_gather():
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(20, 16, 2, 16, generator=generator) for _ in range(2))
    q = torch.randn(3, 4, 16, generator=generator)
    seq_lens = [2, 37, 16]
    tables = torch.tensor([[5, 0, 0], [3, 9, 1], [7, 0, 0]])
    batched = AttentionMetadata(None, [0], [], [], 0, torch.tensor(seq_lens), tables, decode_max_len=37)
    looped = AttentionMetadata(None, [0, 1, 2, 3], seq_lens, list(tables), 3, torch.tensor([]), tables[:0],
                               decode_max_len=0)
    out = torch.empty_like(q)
    chunked_attention(q, q, q, k_cache, v_cache, looped, 0.3, out)  # new keys unused: every context is cached
    torch.testing.assert_close(out, decode_attention_gathered(q, k_cache, v_cache, batched, 0.3))


def test_a_model_decoding_through_the_batched_gather_equals_generate():
    model = model_of("llama")
    prompts = PROMPTS[:3]
    expected = [generate(model, p, 6) for p in prompts]
    runner = ModelRunner(model, block_size=16, max_model_len=128)
    runner.loop_decodes = runner.cpu_kernel = False
    outputs, _ = serve_greedy(runner, prompts, 6, num_blocks=32)
    assert outputs == expected


# ---- cascade attention: decodes sharing a prefix's blocks (CPU) -------------------------------------------------

def _looped_decodes(tables: list[list[int]], seq_lens: list[int], block_size: int, dtype, cascade: bool):
    width = max(len(t) for t in tables)
    padded = torch.tensor([[*t, *[0] * (width - len(t))] for t in tables])
    starts = list(range(len(tables) + 1))
    plan = plan_cascade(tables, seq_lens, starts, 0, block_size, dtype) if cascade else None
    return AttentionMetadata(None, starts, seq_lens, list(padded), len(tables), torch.tensor([]), padded[:0],
                             decode_max_len=0, cascade=plan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_attention_equals_attending_each_decode_alone(dtype):
    """Two groups (one prefix in consecutive blocks, read in place; one scattered, gathered once), tails of
    different lengths, a decode sharing too little to join, one sharing with nobody; grouped query heads."""
    generator = torch.Generator().manual_seed(0)
    block = 4
    k_cache, v_cache = (torch.randn(64, block, 2, 16, generator=generator).to(dtype) for _ in range(2))
    run, scattered = list(range(10, 16)), [30, 2, 25, 7, 19]
    tables = [run + [40], run + [41, 42], run[:5] + [43, 44], scattered + [45], scattered + [46, 47, 48],
              [50, 51, 52, 53, 54, 55], run[:3] + [56]]
    seq_lens = [25, 31, 21, 22, 31, 23, 13]
    q = torch.randn(len(tables), 4, 16, generator=generator).to(dtype)
    plan = _looped_decodes(tables, seq_lens, block, dtype, cascade=True).cascade
    assert [sorted(g.rows.tolist()) for g in plan.groups] == [[0, 1, 2], [3, 4]]
    assert isinstance(plan.groups[0].prefix, slice) and plan.groups[0].prefix == slice(10, 15)  # 5 shared blocks
    assert plan.groups[1].prefix.tolist() == scattered
    outs = []
    for cascade in (False, True):
        meta = _looped_decodes(tables, seq_lens, block, dtype, cascade)
        out = torch.empty_like(q)
        chunked_attention(q, q, q, k_cache, v_cache, meta, 0.25, out)
        if meta.cascade:
            cascade_decode_attention(q, k_cache, v_cache, meta.cascade, 0.25, out)
        outs.append(out.float())
    tolerance = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(outs[1], outs[0], **tolerance)


def test_a_decode_never_shares_the_block_it_writes():
    """Two sequences holding the same blocks up to their last (choices right after their prompt): the prefix stops
    before the block that holds the token being decoded."""
    tables = [[1, 2, 3, 4, 5, 6]] * 2
    plan = plan_cascade(tables, [24, 22], [0, 1, 2], 0, 4, torch.float32)
    assert plan.groups[0].prefix == slice(1, 6)  # 22 tokens: the 6th block holds position 21
    assert plan_cascade(tables, [16, 16], [0, 1, 2], 0, 4, torch.float32) is None  # 3 full blocks: too few


def test_decodes_sharing_a_long_prompt_through_the_prefix_cache_equal_generate(monkeypatch):
    """Four prompts opening with the same 80 tokens: the later ones reuse the first's blocks and their decodes are
    attended together, token for token as generate decodes each alone."""
    model = model_of("llama")
    shared = list(range(3, 83))
    prompts = [[1, *shared, *tail] for tail in ([7], [8, 9], [10, 11, 12], [13])]
    expected = [generate(model, p, 8) for p in prompts]
    planned = []

    def spy(*args):
        plan = plan_cascade(*args)
        planned.append(plan)
        return plan

    monkeypatch.setattr("predictor.engine.model_runner.plan_cascade", spy)
    outputs, _ = serve_greedy(ModelRunner(model, block_size=16, max_model_len=128), prompts, 8, num_blocks=48)
    assert outputs == expected
    assert any(plan and sum(len(g.rows) for g in plan.groups) >= 3 for plan in planned)
