"""The CUDA fast path's decisions and fallbacks, run on the CPU: a capture that fails (by the test fault
injection, which makes the capture run here up to where it records) leaves a runner that serves eagerly with
generate's tokens; --enforce_eager captures nothing; the graphs' replay (inputs into shared static buffers,
padding, logits computed outside for the sampled rows) gives eager's tokens; the worst step for memory sizing
runs through the same code as any step; tensor-parallel ranks agree on one decision."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from servers import REPO, free_port, predictor_env
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from predictor.engine.cuda_graphs import FAIL_CAPTURE_ENV, MAX_GRAPH_BATCH, DecodeGraphs, graph_batch_sizes
from predictor.engine.fast_path import FastPath, _logits_computed_outside_match, warm_up_decode_kernel
from predictor.engine.model_runner import ModelRunner

from .test_model_runner import BLOCK, PROMPTS, SMALL, generate, model_of, serve_greedy

STEPS = 8


def llama_runner() -> ModelRunner:
    return ModelRunner(model_of("llama"), block_size=BLOCK, max_model_len=128)


def off_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("CUDA graphs off:")]


def test_a_failed_capture_leaves_one_log_line_and_an_eager_runner_with_generates_tokens(monkeypatch, caplog):
    monkeypatch.setenv(FAIL_CAPTURE_ENV, "1")
    runner = llama_runner()
    fast_path = FastPath(runner, enforce_eager=False, max_num_seqs=4)
    with caplog.at_level(logging.INFO, logger="predictor.engine.fast_path"):
        assert fast_path.prepare() == 0  # no graph memory to take from the KV cache
        runner.allocate_kv_cache(64)
        fast_path.capture()
    # The largest bucket was warmed up through the graphs' own forward, then failed where recording begins.
    assert off_lines(caplog) == ["CUDA graphs off: CaptureFailed: capturing the decode graph of batch size 4 "
                                 f"failed: RuntimeError: {FAIL_CAPTURE_ENV}=1 (test fault injection)"]
    assert runner.graphs is None and runner.cache.num_blocks == 64
    outputs, _ = serve_greedy(runner, PROMPTS, STEPS, num_blocks=64)
    assert outputs == [generate(runner.model, p, STEPS) for p in PROMPTS]


def test_a_failed_capture_that_left_the_device_broken_still_fails_the_start(monkeypatch):
    """Readiness stays honest: after the failure the device is checked with a tiny operation, here failing as a
    sticky CUDA error would (the one stand-in of this file: a CPU cannot break that way)."""
    monkeypatch.setenv(FAIL_CAPTURE_ENV, "1")
    runner = llama_runner()

    def broken_device():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner, "check_device", broken_device)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        FastPath(runner, enforce_eager=False, max_num_seqs=4).prepare()


def test_enforce_eager_captures_nothing_and_says_so(monkeypatch, caplog):
    monkeypatch.setenv(FAIL_CAPTURE_ENV, "1")  # would fail any capture: none is attempted
    runner = llama_runner()
    with caplog.at_level(logging.INFO, logger="predictor.engine.fast_path"):
        assert FastPath(runner, enforce_eager=True, max_num_seqs=4).prepare() == 0
    assert off_lines(caplog) == ["CUDA graphs off: --enforce_eager"]
    assert runner.graphs is None and runner.cache is None


def test_on_the_cpu_graphs_are_off_because_of_the_device(caplog):
    runner = llama_runner()
    with caplog.at_level(logging.INFO, logger="predictor.engine.fast_path"):
        assert FastPath(runner, enforce_eager=False, max_num_seqs=4).prepare() == 0
    assert off_lines(caplog) == ["CUDA graphs off: the model runs on the cpu, not a CUDA device"]


class EagerReplay:
    """Stands in for a captured CUDA graph on the CPU: replay runs the forward the graph would have recorded."""

    def __init__(self, graphs: DecodeGraphs, size: int):
        self.graphs, self.size = graphs, size

    def replay(self) -> None:
        self.graphs._forward(self.size)


@pytest.mark.parametrize("triton", [False, True], ids=["gather", "triton-interpreted"])
def test_replay_through_the_shared_static_buffers_gives_generates_tokens(triton):
    """Buckets of 2 and 8 rows share one input buffer and one hidden-state buffer: the batches of 4 and 1
    sequences serve_greedy decodes pad up to them, and the logits are computed outside for the sampled rows."""
    runner = llama_runner()
    runner.use_triton = triton  # the kernel, interpreted (TRITON_INTERPRET=1), reads the tables as on CUDA
    runner.allocate_kv_cache(64)
    graphs = DecodeGraphs(runner, [2, 8])
    graphs.graphs = {size: EagerReplay(graphs, size) for size in graphs.sizes}
    runner.graphs = graphs
    replayed = []
    replay = graphs.replay
    graphs.replay = lambda inputs: replayed.append(len(inputs.query_lens)) or replay(inputs)
    outputs, _ = serve_greedy(runner, PROMPTS, STEPS, num_blocks=64)
    assert outputs == [generate(runner.model, p, STEPS) for p in PROMPTS]
    assert set(replayed) == {1, 4}


def test_graph_buckets_stop_at_512():
    assert graph_batch_sizes(4096)[-1] == MAX_GRAPH_BATCH == 512
    assert graph_batch_sizes(1024) == graph_batch_sizes(512)
    assert len(graph_batch_sizes(4096)) == 4 + 512 // 16 - 1 + 1


@pytest.mark.parametrize("make", [
    lambda: model_of("llama"), lambda: model_of("mistral"),
    lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, intermediate_size=128, num_key_value_heads=2)),
    lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                           attn_logit_softcapping=None, final_logit_softcapping=0.5)),
], ids=["llama", "mistral", "qwen2", "gemma2-softcapped"])
def test_logits_computed_outside_the_graph_are_the_models_own(make):
    torch.manual_seed(0)
    runner = ModelRunner(make().eval(), block_size=BLOCK, max_model_len=64)
    assert _logits_computed_outside_match(runner)


def test_a_model_that_scales_its_logits_unknown_to_the_runner_gets_no_graphs():
    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(**SMALL, intermediate_size=128, num_key_value_heads=2, logit_scale=0.25))
    assert not _logits_computed_outside_match(ModelRunner(model.eval(), block_size=BLOCK, max_model_len=64))


def test_the_kernel_warm_up_launches_it_for_the_models_shapes():
    warm_up_decode_kernel(llama_runner())  # interpreted here; on CUDA it compiles and builds the launcher


@pytest.mark.parametrize("architecture", ["llama", "falcon-grouped"])
def test_the_worst_step_is_a_chunk_after_context_with_every_other_row_decoding(architecture):
    runner = ModelRunner(model_of(architecture), block_size=BLOCK, max_model_len=100)
    inputs, num_blocks = runner.worst_step(max_prefill_tokens=48, max_num_seqs=6)
    assert inputs.query_lens == [48, 1, 1, 1, 1, 1] and inputs.seq_lens == [100] * 6
    assert inputs.positions[:48] == list(range(52, 100)) and num_blocks == 1 + 7
    assert inputs.sample_indices == [47, 48, 49, 50, 51, 52]
    assert runner.worst_step(max_prefill_tokens=2048, max_num_seqs=1)[0].query_lens == [99]  # context left
    # Measured through execute(), as any step; the CPU keeps no allocator statistics.
    assert runner.peak_forward_bytes(max_prefill_tokens=48, max_num_seqs=6) == 0
    assert runner.cache is None


AGREEMENT = """
import torch.distributed as dist
from predictor.engine.tp import agreement
dist.init_process_group("gloo")
agree = agreement(dist.new_group(backend="gloo"))
rank = dist.get_rank()
print(agree(True), agree(rank == 0), agree(rank == 1), agree(False))
dist.destroy_process_group()
"""


def test_tensor_parallel_ranks_agree_on_one_decision():
    """A failure on any rank is a failure on all: each rank's FastPath stage calls agree() at the same point."""
    env = predictor_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    ranks = [subprocess.Popen([sys.executable, "-c", AGREEMENT], cwd=REPO, env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [rank.communicate(timeout=120)[0].strip() for rank in ranks]
    assert outputs == ["True False False False"] * 2
