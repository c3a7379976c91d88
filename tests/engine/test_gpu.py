"""The engine on a CUDA device: bf16 greedy parity with generate, CUDA-graph replay equal to eager, preemption
under memory pressure; the compiled decode kernels against SDPA, without recompiles, under graph capture.
Skipped without CUDA; run on the device with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from predictor.engine import triton_attention
from predictor.engine.model_runner import ModelRunner

from .test_model_runner import BLOCK, PROMPTS, generate, serve_greedy
from .test_triton_attention import EAGER_STEPS, KERNELS, eager_step, gathered, paged_case

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


# ---- the Triton decode kernels, compiled --------------------------------------------------------------------------

KERNEL_SHAPES = {"llama-2-7b": (32, 32, 128), "tinyllama-1.1b": (32, 4, 64)}  # heads, KV heads, head size


@pytest.mark.parametrize("shape", sorted(KERNEL_SHAPES))
def test_compiled_bf16_kernel_equals_fp32_sdpa_on_the_same_values(shape):
    heads, kv_heads, head_dim = KERNEL_SHAPES[shape]
    lengths = [0, 1, 64, 129, 700, 2048]
    q, k_cache, v_cache, tables, seq_lens = (
        t.cuda() for t in paged_case(lengths, kv_heads, head_dim, BLOCK, heads, dtype=torch.bfloat16))
    expected = gathered(q, k_cache, v_cache, tables, seq_lens, head_dim ** -0.5)
    for num_splits in (1, None):
        out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, head_dim ** -0.5,
                                                      num_splits=num_splits)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_batch_one_splits_to_fill_the_sms():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = triton_attention.split_count(1, 32, 2048 // BLOCK, BLOCK, torch.device("cuda"))
    assert splits > 1 and 32 * splits >= sms


def compiled_variants() -> int:
    return sum(len(caches[0]) for kernel in KERNELS for caches in kernel.device_caches.values())


def test_no_kernel_compiles_after_warm_up_across_varied_eager_steps():
    heads, kv_heads, head_dim = KERNEL_SHAPES["tinyllama-1.1b"]
    k_cache = v_cache = torch.randn(64, BLOCK, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    triton_attention.warm_up(k_cache, v_cache, heads)
    warmed = compiled_variants()
    for packed_offset, lengths, width, decode_start in EAGER_STEPS:
        q, tables, seq_lens = eager_step(packed_offset, lengths, width, decode_start, k_cache, heads, BLOCK)
        triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125)
    torch.cuda.synchronize()
    assert compiled_variants() == warmed


def test_a_captured_split_kernel_replays_new_lengths_and_tables_like_eager():
    """The grid and launch arguments depend on shapes only: a graph captured once attends whatever lengths and
    blocks its buffers hold at replay, split and merged as an eager call would."""
    heads, kv_heads, head_dim = KERNEL_SHAPES["llama-2-7b"]
    q, k_cache, v_cache, tables, seq_lens = (
        t.cuda() for t in paged_case([5, 300], kv_heads, head_dim, BLOCK, heads, dtype=torch.bfloat16))
    static_tables = torch.zeros(2, 256 // BLOCK * 4, dtype=torch.int64, device="cuda")
    static_lens = torch.zeros(2, dtype=torch.int64, device="cuda")
    assert triton_attention.split_count(2, kv_heads, static_tables.shape[1], BLOCK, q.device) > 1
    triton_attention.paged_decode_attention(q, k_cache, v_cache, static_tables, static_lens, 0.1)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.paged_decode_attention(q, k_cache, v_cache, static_tables, static_lens, 0.1)
    for lengths in ([5, 300], [300, 0], [1, 17]):
        static_lens.copy_(torch.tensor(lengths))
        static_tables.zero_()
        static_tables[:, :tables.shape[1]] = tables
        graph.replay()
        eager = triton_attention.paged_decode_attention(q, k_cache, v_cache, static_tables, static_lens, 0.1)
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
