"""The engine on a CUDA device: bf16 greedy parity with generate, CUDA-graph replay equal to eager, preemption
under memory pressure. Skipped without CUDA; run on the device with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from predictor.engine.model_runner import ModelRunner

from .test_model_runner import BLOCK, PROMPTS, generate, serve_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 24


def cuda_llama(dtype: torch.dtype):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512)
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def bf16_llama():
    return cuda_llama(torch.bfloat16)


def runner_for(model, graphs: bool, num_blocks: int = 64, max_num_seqs: int = 8) -> ModelRunner:
    runner = ModelRunner(model, block_size=BLOCK, max_model_len=256)
    runner.allocate_kv_cache(num_blocks)
    if graphs:
        runner.capture_decode_graphs(max_num_seqs)
        assert runner.graphs, "no CUDA graph was captured"
    return runner


def test_bf16_greedy_decode_matches_generate_one_sequence_at_a_time(bf16_llama):
    """One sequence per batch: the same kernels' shapes as generate, so the tokens agree."""
    for prompt in PROMPTS[:3]:
        runner = runner_for(bf16_llama, graphs=False)
        (output,), _ = serve_greedy(runner, [prompt], STEPS, num_blocks=64)
        expected = generate(bf16_llama, prompt, STEPS)
        agreeing = next((i for i, (a, b) in enumerate(zip(output, expected)) if a != b), STEPS)
        assert agreeing >= STEPS // 2, f"bf16 diverged from generate at token {agreeing}: {output} vs {expected}"


def test_cuda_graph_replay_gives_the_tokens_eager_gives(bf16_llama):
    eager, _ = serve_greedy(runner_for(bf16_llama, graphs=False), PROMPTS, STEPS, num_blocks=64)
    graphed, _ = serve_greedy(runner_for(bf16_llama, graphs=True), PROMPTS, STEPS, num_blocks=64)
    assert graphed == eager


def test_preemption_under_memory_pressure_keeps_greedy_parity_in_fp32():
    """Recomputing a preempted sequence runs prefill kernels where decode kernels ran: fp32 (no TF32) keeps
    both equal to generate's tokens; bf16 would legitimately drift."""
    model = cuda_llama(torch.float32)
    expected = [generate(model, p, 40) for p in PROMPTS]
    tight, preempted = serve_greedy(runner_for(model, graphs=True, num_blocks=1 + 8), PROMPTS, 40, num_blocks=1 + 8)
    assert preempted > 0 and tight == expected
