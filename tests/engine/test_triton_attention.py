"""The Triton decode kernel that serves CUDA, checked here on the CPU by Triton's interpreter (compiled on a GPU):
it must equal the gathering SDPA path, alone and inside a model's forward."""

from __future__ import annotations

import pytest
import torch

from predictor.engine import triton_attention  # tests/conftest.py has the CPU interpret it
from predictor.engine.attention import AttentionMetadata, decode_attention_gathered

from .test_model_runner import PROMPTS, generate, model_of, serve_greedy

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(4, 2, 16, 16), (8, 8, 64, 16), (8, 1, 32, 32),
                                                                     (6, 2, 24, 16)])
def test_decode_kernel_equals_gathered_attention(heads, kv_heads, head_dim, block_size):
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(20, block_size, kv_heads, head_dim, generator=generator).to(DEVICE)
                        for _ in range(2))
    q = torch.randn(3, heads, head_dim, generator=generator).to(DEVICE)
    seq_lens = torch.tensor([1, 37, 0], device=DEVICE)  # 0: a padded row of a captured batch
    tables = torch.tensor([[5, 0, 0], [3, 9, 1], [0, 0, 0]], device=DEVICE)
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.3)
    meta = AttentionMetadata(None, [0], [], [], 0, seq_lens[:2], tables[:2], decode_max_len=37)
    expected = decode_attention_gathered(q[:2], k_cache, v_cache, meta, 0.3)
    torch.testing.assert_close(out[:2], expected, atol=1e-4 if ON_GPU else 1e-5, rtol=1e-4)
    assert torch.all(out[2] == 0)


def test_a_model_decoding_through_the_kernel_equals_generate():
    from predictor.engine.model_runner import ModelRunner

    model = model_of("llama").to(DEVICE)
    prompts = PROMPTS[:3]
    expected = [generate(model.cpu(), p, 6) for p in prompts]
    runner = ModelRunner(model.to(DEVICE), block_size=16, max_model_len=128)
    runner.use_triton = True
    outputs, _ = serve_greedy(runner, prompts, 6, num_blocks=32)
    assert outputs == expected
