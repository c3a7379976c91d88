"""Decode attention over the paged cache: the per-sequence loop (CPU) equals the batched gather (CUDA without
Triton), alone and inside a model's forward; tests/engine/test_triton_attention.py holds the kernel to the gather."""

from __future__ import annotations

import torch

from predictor.engine.attention import AttentionMetadata, chunked_attention, decode_attention_gathered
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
    runner.loop_decodes = False
    outputs, _ = serve_greedy(runner, prompts, 6, num_blocks=32)
    assert outputs == expected
