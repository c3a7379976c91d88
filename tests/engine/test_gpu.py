"""The engine on a CUDA device: bf16 greedy parity with generate, CUDA-graph replay equal to eager, preemption
under memory pressure, the graphs' memory, the worst step's memory, the compiled decode kernels against SDPA
(without recompiles, under graph capture), async scheduling (parity, and decode steps launched without the host
waiting for the device), and the server's start-up on CUDA: graphs captured and budgeted, the two forced fallbacks
(a Triton that cannot build its launcher, a failed capture) serving eagerly, and --async_scheduling. Skipped
without CUDA; run on the device with `pytest -m gpu` (build/device_check.sh)."""

from __future__ import annotations

import httpx
import pytest
import torch
from models import greedy_reference
from servers import predictor_env, start
from transformers import LlamaConfig, LlamaForCausalLM

from predictor.engine import triton_attention
from predictor.engine.core import EngineCore
from predictor.engine.cuda_graphs import FAIL_CAPTURE_ENV, DecodeGraphs, graph_batch_sizes
from predictor.engine.fast_path import FastPath
from predictor.engine.model_inputs import ModelInputs
from predictor.engine.model_runner import ModelRunner
from predictor.engine.sampling_params import SamplingParams
from predictor.engine.sequence import Sequence

from .test_model_runner import BLOCK, PROMPTS, generate, serve_greedy
from .test_triton_attention import EAGER_STEPS, KERNELS, eager_step, gathered, paged_case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 24
SERVER_PROMPTS = ["Hello", "The capital of France is", "Once upon a time"]


def cuda_llama(dtype: torch.dtype, max_position_embeddings: int = 512):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=max_position_embeddings)
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def bf16_llama():
    return cuda_llama(torch.bfloat16)


def runner_for(model, graphs: bool, num_blocks: int = 64, max_num_seqs: int = 8) -> ModelRunner:
    """Started as core_process.load starts it: the fast path prepared, the cache allocated, the graphs captured."""
    runner = ModelRunner(model, block_size=BLOCK, max_model_len=256)
    fast_path = FastPath(runner, enforce_eager=not graphs, max_num_seqs=max_num_seqs)
    fast_path.prepare()
    runner.allocate_kv_cache(num_blocks)
    fast_path.capture()
    assert (runner.graphs is not None) == graphs, fast_path.off_reason
    return runner


def counting_replays(runner: ModelRunner) -> list[int]:
    """The batch sizes the runner's graphs replay from now on (so that a test knows graphs, not eager, ran)."""
    replayed, replay = [], runner.graphs.replay
    runner.graphs.replay = lambda inputs: replayed.append(len(inputs.query_lens)) or replay(inputs)
    return replayed


def test_bf16_greedy_decode_matches_generate_one_sequence_at_a_time(bf16_llama):
    """One sequence per batch: the same kernels' shapes as generate, so the tokens agree."""
    for prompt in PROMPTS[:3]:
        runner = runner_for(bf16_llama, graphs=False)
        (output,), _ = serve_greedy(runner, [prompt], STEPS, num_blocks=64)
        expected = generate(bf16_llama, prompt, STEPS)
        agreeing = next((i for i, (a, b) in enumerate(zip(output, expected)) if a != b), STEPS)
        assert agreeing >= STEPS // 2, f"bf16 diverged from generate at token {agreeing}: {output} vs {expected}"


def test_cuda_graph_replay_gives_the_tokens_eager_gives_in_fp32():
    """fp32 (no TF32): padded rows and bucket shapes change nothing. Buckets of 2 and 8 rows: serve_greedy's
    decode batches of 4 and 1 sequences are padded up to them."""
    model = cuda_llama(torch.float32)
    eager, _ = serve_greedy(runner_for(model, graphs=False), PROMPTS, STEPS, num_blocks=64)
    runner = runner_for(model, graphs=False)
    runner.graphs = DecodeGraphs(runner, [2, 8])
    runner.graphs.capture()
    replayed = counting_replays(runner)
    graphed, _ = serve_greedy(runner, PROMPTS, STEPS, num_blocks=64)
    assert graphed == eager == [generate(model, p, STEPS) for p in PROMPTS]
    assert set(replayed) == {1, 4}


def test_cuda_graph_replay_stays_with_eager_in_bf16(bf16_llama):
    eager, _ = serve_greedy(runner_for(bf16_llama, graphs=False), PROMPTS, STEPS, num_blocks=64)
    runner = runner_for(bf16_llama, graphs=True)
    replayed = counting_replays(runner)
    graphed, _ = serve_greedy(runner, PROMPTS, STEPS, num_blocks=64)
    assert replayed
    for output, expected in zip(graphed, eager):
        agreeing = next((i for i, (a, b) in enumerate(zip(output, expected)) if a != b), STEPS)
        assert agreeing >= STEPS // 2, f"graphs diverged from eager at token {agreeing}: {output} vs {expected}"


def test_preemption_under_memory_pressure_keeps_greedy_parity_in_fp32():
    """Recomputing a preempted sequence runs prefill kernels where decode kernels ran: fp32 (no TF32) keeps
    both equal to generate's tokens; bf16 would legitimately drift."""
    model = cuda_llama(torch.float32)
    expected = [generate(model, p, 40) for p in PROMPTS]
    tight, preempted = serve_greedy(runner_for(model, graphs=True, num_blocks=1 + 8), PROMPTS, 40, num_blocks=1 + 8)
    assert preempted > 0 and tight == expected


# ---- async scheduling --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_async_scheduling_keeps_fp32_greedy_parity_through_preemption(graphs):
    """The pending tokens are filled in on the device, into the eager step's inputs or the graphs' buffers."""
    model = cuda_llama(torch.float32)
    expected = [generate(model, p, 40) for p in PROMPTS]
    runner = runner_for(model, graphs=graphs)
    replayed = counting_replays(runner) if graphs else []
    roomy, _ = serve_greedy(runner, PROMPTS, 40, num_blocks=64, async_scheduling=True)
    tight, preempted = serve_greedy(runner_for(model, graphs=graphs, num_blocks=1 + 8), PROMPTS, 40,
                                    num_blocks=1 + 8, async_scheduling=True)
    assert roomy == tight == expected and preempted > 0
    assert bool(replayed) == graphs


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_async_decode_steps_launch_without_waiting_for_the_device(bf16_llama, graphs):
    """torch's sync debug mode raises on any operation that makes the host wait for the device (a pageable copy,
    .item(), .tolist(), boolean indexing): steps of greedy, sampled and penalized rows must launch without one.
    Waiting for the step before, in Sampler.resolve, is the one wait there is."""
    runner = runner_for(bf16_llama, graphs=graphs)
    core = EngineCore(runner, num_blocks=64, block_size=BLOCK, max_num_seqs=8, max_prefill_tokens=256,
                      max_model_len=256, async_scheduling=True)
    params = [SamplingParams(temperature=0, max_new_tokens=STEPS), SamplingParams(max_new_tokens=STEPS, seed=3),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=STEPS),
              SamplingParams(temperature=0, frequency_penalty=0.5, repetition_penalty=1.2, max_new_tokens=STEPS)]
    for i, p in enumerate(params):
        core.add(Sequence(i, PROMPTS[i], p, frozenset({2})))
    core.step()
    core.step()  # the prompts, then the first decode: every row admitted
    resolve = core.sampler.resolve

    def resolve_may_wait(draw):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return resolve(draw)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    core.sampler.resolve = resolve_may_wait
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            core.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    while core.has_work:
        core.step()


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


# ---- graph and step memory -------------------------------------------------------------------------------------

def test_graphs_of_1024_sequences_stop_at_512_and_their_memory_is_measured(bf16_llama):
    """Logits per bucket would have taken sum(sizes) x vocab x 2 bytes (2 GiB here); the shared hidden-state buffer
    and one pool take a few MiB."""
    runner = ModelRunner(bf16_llama, block_size=BLOCK, max_model_len=256)
    fast_path = FastPath(runner, enforce_eager=False, max_num_seqs=1024)
    measured = fast_path.prepare()
    assert runner.graphs is None and runner.cache is None  # the measuring capture is gone
    runner.allocate_kv_cache(64)
    fast_path.capture()
    assert sorted(runner.graphs.graphs) == graph_batch_sizes(1024) and runner.graphs.largest == 512
    assert 0 < measured < 256 * 2**20 and 0 < fast_path.graph_bytes < 256 * 2**20, (measured, fast_path.graph_bytes)
    print(f"graph memory: {measured / 2**20:.1f} MiB measured, {fast_path.graph_bytes / 2**20:.1f} MiB kept")


def test_the_worst_step_peaks_above_a_fresh_prompt_of_the_same_length():
    """A chunk after cached context with grouped KV heads takes SDPA's math path ([heads, chunk, context] scores);
    a fresh prompt takes a fused kernel. The KV budget must count the former."""
    runner = ModelRunner(cuda_llama(torch.bfloat16, max_position_embeddings=4096), block_size=BLOCK,
                         max_model_len=4096)
    worst = runner.peak_forward_bytes(max_prefill_tokens=1024, max_num_seqs=8)
    _, num_blocks = runner.worst_step(1024, 8)
    runner.allocate_kv_cache(num_blocks)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        runner.execute(ModelInputs([0] * 1024, list(range(1024)), list(range(BLOCK, BLOCK + 1024)), [1024], [1024],
                                   [list(range(1, num_blocks))], [1023]))
    torch.cuda.synchronize()
    fresh = torch.cuda.max_memory_allocated()
    runner.free_kv_cache()
    print(f"peak: worst step {worst / 2**20:.0f} MiB, fresh prompt {fresh / 2**20:.0f} MiB")
    assert worst > fresh + 32 * 2**20


# ---- the server's start-up on CUDA -----------------------------------------------------------------------------

def serve_and_check(tiny_llama, reference, log, env: dict, *args: str) -> str:
    """Start the server on CUDA in fp32, check greedy parity with generate, return its log."""
    server = start(tiny_llama, log, "--device=cuda", "--dtype=float32", "--max_num_seqs=8", "--max_model_len=256",
                   *args, env=predictor_env(**env))
    try:
        assert httpx.get(f"{server.url}/v1/models/{server.model_name}", timeout=10).status_code == 200
        for prompt in SERVER_PROMPTS:
            response = httpx.post(f"{server.url}/openai/v1/completions", timeout=60, json={
                "model": server.model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == greedy_reference(reference, prompt, 8)
        return server.output()
    finally:
        server.stop()


def off_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CUDA graphs off:" in line]


def test_the_server_captures_graphs_and_takes_their_memory_from_the_kv_budget(tiny_llama, reference, tmp_path):
    log = serve_and_check(tiny_llama, reference, tmp_path / "server.log", {})
    print("\n".join(line for line in log.splitlines() if "CUDA" in line or "KV cache" in line))
    assert not off_lines(log)
    assert "CUDA graphs: 4 decode batch sizes captured (1, 2, 4, 8)" in log
    assert "GiB for CUDA graphs" in log and "KV cache (gpu_memory_utilization)" in log


def test_a_triton_that_cannot_build_its_launcher_leaves_the_gather_path_serving(tiny_llama, reference, tmp_path):
    """A real failure: no C compiler for Triton's launcher, and no cache holding one already built."""
    log = serve_and_check(tiny_llama, reference, tmp_path / "server.log",
                          {"CC": "/bin/false", "TRITON_CACHE_DIR": str(tmp_path / "empty-triton-cache")})
    (line,) = off_lines(log)
    assert "the Triton decode kernel is unusable" in line and "decodes take the gather path" in line


def test_a_failed_capture_on_cuda_serves_eagerly_with_the_kernel(tiny_llama, reference, tmp_path):
    log = serve_and_check(tiny_llama, reference, tmp_path / "server.log", {FAIL_CAPTURE_ENV: "1"})
    (line,) = off_lines(log)
    assert "capturing the decode graph of batch size 8 failed" in line


def test_the_server_with_async_scheduling_keeps_greedy_parity(tiny_llama, reference, tmp_path):
    log = serve_and_check(tiny_llama, reference, tmp_path / "server.log", {}, "--async_scheduling")
    assert "async scheduling is on" in log and not off_lines(log)
