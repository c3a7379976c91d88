"""The Triton decode kernel alone on the GPU: achieved KV read bandwidth against the device's copy bandwidth.

`python -m predictor.tools.bench.kernel` times one decode attention call (one layer) for the benchmark shapes'
head configurations, bf16, at batch 1/16/64 and contexts of 512/2048 tokens, every sequence full length: split
as the kernel chooses for the device, and with one split for comparison. Calls are replayed from a CUDA graph,
as the server's decode steps are, so the figure is the GPU's time and not Python's launch overhead. Without
CUDA it says so and exits 0.
"""

from __future__ import annotations

import torch

from predictor.tools.bench.shapes import SHAPES

BATCHES = (1, 16, 64)
CONTEXTS = (512, 2048)
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
CALLS_PER_GRAPH = 20
REPLAYS = 10


def gpu_ms(run, replays: int = REPLAYS) -> float:
    """Milliseconds per replay of `run` (a callable) after one warm-up, by CUDA events."""
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def copy_gb_per_s() -> float:
    """Bytes read and written per second by a plain device-to-device copy of 1 GiB: the memory roofline."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() / gpu_ms(lambda: target.copy_(source)) / 1e6


def graphed(call):
    """CALLS_PER_GRAPH calls captured in one CUDA graph: replaying it times the kernels without launch overhead."""
    call()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            call()
    return graph.replay


def kernel_case(heads: int, kv_heads: int, head_dim: int, batch: int, context: int):
    """(the kernel's call, its split count, the KV bytes one call reads) over full-length sequences whose blocks
    are scattered over the cache."""
    from predictor.engine import triton_attention

    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq + 1
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = (torch.randperm(num_blocks - 1, device="cuda") + 1).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int64, device="cuda")
    q = torch.randn(batch, heads, head_dim, dtype=DTYPE, device="cuda")
    splits = triton_attention.split_count(batch, kv_heads, blocks_per_seq, BLOCK_SIZE, q.device)

    def call(num_splits=None):
        return lambda: triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens,
                                                               head_dim ** -0.5, num_splits=num_splits)

    kv_bytes = 2 * batch * context * kv_heads * head_dim * k_cache.element_size()
    return call(), call(1), splits, kv_bytes


def main() -> int:
    if not torch.cuda.is_available():
        print("kernel benchmark: needs CUDA (no device here); nothing measured")
        return 0
    from predictor.engine import triton_attention

    device = torch.cuda.get_device_name(0)
    roofline = copy_gb_per_s()
    print(f"{device}: device copy {roofline:.0f} GB/s (read + write). Decode attention per call (one layer), "
          f"bf16, block {BLOCK_SIZE}, tile {triton_attention.TILE_TOKENS}, full-length sequences:")
    print(f"{'shape':<16}{'batch':>6}{'context':>8}{'splits':>7}{'us':>9}{'GB/s':>8}{'of copy':>8}"
          f"{'us 1 split':>11}{'GB/s':>8}")
    for name, shape in SHAPES.items():
        heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        head_dim = shape["hidden_size"] // heads
        for batch in BATCHES:
            for context in CONTEXTS:
                split, single, splits, kv_bytes = kernel_case(heads, kv_heads, head_dim, batch, context)
                split_us = gpu_ms(graphed(split)) / CALLS_PER_GRAPH * 1e3
                single_us = gpu_ms(graphed(single)) / CALLS_PER_GRAPH * 1e3
                split_gbs, single_gbs = kv_bytes / split_us / 1e3, kv_bytes / single_us / 1e3
                print(f"{name:<16}{batch:>6}{context:>8}{splits:>7}{split_us:>9.1f}{split_gbs:>8.0f}"
                      f"{split_gbs / roofline:>8.0%}{single_us:>11.1f}{single_gbs:>8.0f}")
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
