"""The CPU decode attention kernel (csrc/paged_decode_cpu.c): equal to torch's SDPA over each decode's gathered
context, alone and inside a model's forward next to cascade groups; without a compiler the runner gathers."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from predictor.engine import cpu_decode_attention
from predictor.engine.attention import gather_context
from predictor.engine.cascade_attention import plan_cascade
from predictor.engine.cpu_decode_attention import CpuDecodes
from predictor.engine.model_runner import ModelRunner

from .test_model_runner import PROMPTS, generate, model_of, serve_greedy


def attend_alone(q: torch.Tensor, k_cache, v_cache, table: torch.Tensor, length: int, scale: float) -> torch.Tensor:
    keys, values = (gather_context(cache, table, length).transpose(0, 1)[None] for cache in (k_cache, v_cache))
    return F.scaled_dot_product_attention(q[None, :, None], keys, values, scale=scale, enable_gqa=True)[0, :, 0]


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"),
                         [(4, 4, 16, 16), (8, 2, 32, 4), (6, 1, 80, 128), (64, 1, 256, 16)],
                         ids=["mha", "gqa", "mqa-long-blocks", "widest"])
def test_the_kernel_equals_attending_each_decode_alone(heads, kv_heads, head_dim, block_size):
    """Scattered blocks, lengths from 1 to past a block, queries laid out as the model hands them ([heads, T, dim]
    transposed); rows it is not given stay as they were."""
    generator = torch.Generator().manual_seed(0)
    num_blocks, width = 40, 6
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
                        for _ in range(2))
    seq_lens = torch.tensor([1, block_size, block_size + 1, width * block_size - 3, 7])
    tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:width] for _ in seq_lens])
    tokens = len(seq_lens) + 2  # rows 0 and 1 stand for a prefill chunk's tokens
    q = torch.randn(heads, tokens, head_dim, generator=generator).transpose(0, 1)
    out = torch.full_like(q, 7.0)
    seqs = torch.tensor([0, 1, 2, 4, 3])
    rows = seqs + 2
    scale = head_dim ** -0.5
    cpu_decode_attention.paged_decode_attention(q, k_cache, v_cache, CpuDecodes(rows, seqs, tables, seq_lens), scale,
                                                out)
    for row, seq in zip(rows.tolist(), seqs.tolist()):
        expected = attend_alone(q[row], k_cache, v_cache, tables[seq], int(seq_lens[seq]), scale)
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)
    assert (out[:2] == 7.0).all()


def test_a_model_decoding_through_the_kernel_next_to_cascade_groups_equals_generate(monkeypatch):
    """Three prompts sharing 80 tokens (their decodes attended together by cascade) and three of their own (the
    kernel's), four at a time: token for token what generate gives each alone, with steps where both ran."""
    model = model_of("llama")
    shared = list(range(3, 83))
    prompts = [[1, *shared, 7], [1, *shared, 8, 9], [1, *shared, 10], *PROMPTS[:3]]
    expected = [generate(model, p, 8) for p in prompts]
    planned, attended = [], []

    def plan_spy(*args):
        plan = plan_cascade(*args)
        planned.append(plan)
        return plan

    def kernel_spy(q, k_cache, v_cache, decodes, scale, out):
        attended.append((planned[-1], decodes.count))
        return kernel(q, k_cache, v_cache, decodes, scale, out)

    kernel = cpu_decode_attention.paged_decode_attention
    monkeypatch.setattr("predictor.engine.model_runner.plan_cascade", plan_spy)
    monkeypatch.setattr(cpu_decode_attention, "paged_decode_attention", kernel_spy)
    runner = ModelRunner(model, block_size=16, max_model_len=128)
    assert runner.cpu_kernel and not runner.loop_decodes
    outputs, _ = serve_greedy(runner, prompts, 8, num_blocks=64)
    assert outputs == expected
    assert any(plan and len(plan.groups[0].rows) == 3 for plan in planned)
    assert any(plan and count >= 1 for plan, count in attended)
    assert max(count for _, count in attended) >= 2


@pytest.fixture
def no_loaded_kernel():
    cpu_decode_attention.kernel.cache_clear()
    yield
    cpu_decode_attention.kernel.cache_clear()


def test_without_a_compiler_the_runner_gathers_and_says_why(monkeypatch, caplog, no_loaded_kernel):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    model = model_of("llama")
    prompts = PROMPTS[:2]
    expected = [generate(model, p, 4) for p in prompts]
    with caplog.at_level(logging.WARNING):
        runner = ModelRunner(model, block_size=16, max_model_len=128)
    assert not runner.cpu_kernel and runner.loop_decodes
    assert "CPU decode attention kernel off" in caplog.text and "/nonexistent/cc" in caplog.text
    assert serve_greedy(runner, prompts, 4, num_blocks=16)[0] == expected


def test_a_bfloat16_model_is_not_given_to_the_float32_kernel(caplog):
    with caplog.at_level(logging.WARNING):
        runner = ModelRunner(model_of("llama").to(torch.bfloat16), block_size=16, max_model_len=128)
    assert not runner.cpu_kernel and runner.loop_decodes
    assert "float32 only" in caplog.text
