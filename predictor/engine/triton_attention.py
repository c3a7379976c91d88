"""Decode attention straight from the paged KV cache, as Triton kernels (CUDA; the tests run them interpreted).

Split-KV (flash-decoding): the grid is (sequence, KV head, split). Each program attends the query heads that share
its KV head (GQA) over a contiguous range of its sequence's 64-token tiles with an online softmax, so each cached
key and value is read once per step; a tile spans several blocks, or part of one. With several splits, each writes
a partial (max, sum, weighted values) and a reduce kernel merges them; with one, the program writes the output.

Capture-safe: the grid and every launch argument depend on host values a captured graph fixes (batch rows, table
width, shapes, dtype). A sequence's own tiles are divided among the splits inside the kernel, from its length
read on the device; a length-0 row (padding of a captured batch) yields zeros.

No recompiles under traffic: Triton keys its compiled variants on each integer argument's value class (== 1,
% 16) and each pointer's 16-byte alignment. The arguments that vary from step to step (query strides, the block
table's row stride, views into a step's packed tensor) are excluded from that key, so one variant per cache
layout and per split mode serves every step; warm_up compiles them at start.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TILE_TOKENS = 64
INTERPRETED_PROGRAMS = 16  # the grid size splitting aims for without a GPU (the interpreter's tests)


@triton.jit
def _split_tiles(seq_len, num_splits, TILE: tl.constexpr):
    """(the sequence's tiles, tiles per split): its tiles divided evenly among the splits, so that split s attends
    tiles [s * per_split, (s + 1) * per_split) and the last splits none when the sequence is short."""
    tiles = tl.cdiv(seq_len, TILE)
    return tiles, tl.maximum(tl.cdiv(tiles, num_splits), 1)


@triton.jit
def _attend_tile(q, k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head, tile, seq_len, scale, best, total, acc,
                 stride_kb, stride_kt, stride_kh, dims, dim_ok, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Fold one tile of keys and values into the running (max, sum, weighted values) of the online softmax."""
    positions = tile * TILE + tl.arange(0, TILE)
    visible = positions < seq_len
    blocks = tl.load(table_row_ptr + positions // BLOCK_SIZE, mask=visible, other=0)
    offsets = (blocks[:, None] * stride_kb + (positions % BLOCK_SIZE)[:, None] * stride_kt + kv_head * stride_kh
               + dims[None, :])
    kv_mask = visible[:, None] & dim_ok[None, :]
    k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
    if INTERPRETED:  # the interpreter multiplies bf16/fp16 by their raw bits: attend in fp32
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE], fp32
    scores = tl.where(visible[None, :], scores, float("-inf"))
    new_best = tl.maximum(best, tl.max(scores, axis=1))
    weights = tl.exp(scores - new_best[:, None])
    rescale = tl.exp(best - new_best)
    total = total * rescale + tl.sum(weights, axis=1)
    acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
    return new_best, total, acc


# Arguments that change between steps (views into a step's packed tensor, the query's and block table's strides)
# are keyed neither on their value (ints: == 1, % 16) nor on their alignment (pointers).
@triton.jit(do_not_specialize=("stride_qb", "stride_qh", "stride_bt"),
            do_not_specialize_on_alignment=("q_ptr", "block_tables_ptr", "seq_lens_ptr"))
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, partial_max_ptr, partial_sum_ptr,
    partial_acc_ptr, scale, stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    group_heads = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group_heads
    dims = tl.arange(0, DIM_PAD)
    head_ok = group_heads < GROUP
    dim_ok = dims < HEAD_DIM

    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    seq_len = tl.load(seq_lens_ptr + seq)
    table_row_ptr = block_tables_ptr + seq * stride_bt
    tiles, per_split = _split_tiles(seq_len, num_splits, TILE)
    first = split * per_split
    last = tl.minimum(first + per_split, tiles)
    best = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    total = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    if INTERPRETED:  # the interpreter cannot take a loaded value as a range() bound
        tile = first
        while tile < last:
            best, total, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head, tile, seq_len,
                                            scale, best, total, acc, stride_kb, stride_kt, stride_kh, dims, dim_ok,
                                            BLOCK_SIZE, TILE, PRECISION, INTERPRETED)
            tile += 1
    else:
        for tile in range(first, last):
            best, total, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head, tile, seq_len,
                                            scale, best, total, acc, stride_kb, stride_kt, stride_kh, dims, dim_ok,
                                            BLOCK_SIZE, TILE, PRECISION, INTERPRETED)

    num_heads = tl.num_programs(1) * GROUP
    out_mask = head_ok[:, None] & dim_ok[None, :]
    if SPLIT:  # a partial per (sequence, split, head); a split with no tiles writes nothing and is not merged
        rows = (seq * num_splits + split) * num_heads + heads
        attended = first < last
        tl.store(partial_max_ptr + rows, best, mask=head_ok & attended)
        tl.store(partial_sum_ptr + rows, total, mask=head_ok & attended)
        tl.store(partial_acc_ptr + rows[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask & attended)
    else:
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_ptr + (seq * num_heads + heads)[:, None] * HEAD_DIM + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=("num_splits",), do_not_specialize_on_alignment=("seq_lens_ptr",))
def _merge_splits_kernel(
    seq_lens_ptr, out_ptr, partial_max_ptr, partial_sum_ptr, partial_acc_ptr, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    TILE: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Merge the partials of the splits that attended something into the output, one program per (sequence,
    KV head) like the attention kernel."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    group_heads = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group_heads
    dims = tl.arange(0, DIM_PAD)
    head_ok = group_heads < GROUP
    dim_ok = dims < HEAD_DIM
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    best = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    total = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    tiles, per_split = _split_tiles(seq_len, num_splits, TILE)
    active = tl.cdiv(tiles, per_split)  # the splits that attended something
    split = 0
    while split < active:
        rows = (seq * num_splits + split) * num_heads + heads
        split_best = tl.load(partial_max_ptr + rows, mask=head_ok, other=0.0)
        new_best = tl.maximum(best, split_best)
        rescale = tl.exp(best - new_best)
        weight = tl.exp(split_best - new_best)
        total = total * rescale + tl.load(partial_sum_ptr + rows, mask=head_ok, other=0.0) * weight
        split_acc = tl.load(partial_acc_ptr + rows[:, None] * HEAD_DIM + dims[None, :],
                            mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * rescale[:, None] + split_acc * weight[:, None]
        best = new_best
        split += 1
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + (seq * num_heads + heads)[:, None] * HEAD_DIM + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


@functools.cache
def _target_programs(device: torch.device) -> int:
    """About two waves of the device's SMs; a fixed count in the interpreter."""
    if device.type != "cuda":
        return INTERPRETED_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def split_count(batch: int, kv_heads: int, table_width: int, block_size: int, device: torch.device) -> int:
    """Splits per (sequence, KV head) so that the grid fills the device: never more than the tiles of the longest
    sequence the block tables can hold, one when the batch's heads already fill it."""
    programs = max(batch * kv_heads, 1)
    max_tiles = triton.cdiv(table_width * block_size, TILE_TOKENS)
    return max(1, min(triton.cdiv(_target_programs(device), programs), max_tiles))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, *, num_splits: int | None = None) -> torch.Tensor:
    """q [B, heads, dim]; caches [blocks, block_size, kv_heads, dim]; block_tables [B, max_blocks]; seq_lens [B].
    Returns [B, heads, dim]. num_splits overrides the split count chosen for the device (tests)."""
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    group = heads // kv_heads
    splits = num_splits or split_count(batch, kv_heads, block_tables.shape[1], block_size, q.device)
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    split = splits > 1
    partial_shape = (batch * splits * heads,) if split else (1,)
    partial_max = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    partial_sum = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
    partial_acc = torch.empty(*partial_shape, head_dim if split else 1, dtype=torch.float32, device=q.device)
    shape = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                 DIM_PAD=max(16, triton.next_power_of_2(head_dim)), TILE=TILE_TOKENS, INTERPRETED=INTERPRETED)
    _paged_decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, partial_max, partial_sum, partial_acc, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        BLOCK_SIZE=block_size, SPLIT=split, **shape,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32; bf16/fp16 ignore it
    )
    if split:
        _merge_splits_kernel[(batch, kv_heads)](seq_lens, out, partial_max, partial_sum, partial_acc, splits,
                                                **shape)
    return out


def warm_up(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> None:
    """Compile every variant decode steps over these caches will launch (with and without split merging), so
    that none compiles on the engine thread under traffic. Call once per cache layout at start; it attends
    nothing (every length is 0)."""
    _, block_size, _, head_dim = k_cache.shape
    device = k_cache.device
    width = triton.cdiv(2 * TILE_TOKENS, block_size)  # room for two tiles, so two splits
    tables = torch.zeros(1, width, dtype=torch.int64, device=device)
    seq_lens = torch.zeros(1, dtype=torch.int64, device=device)
    q = torch.zeros(1, num_heads, head_dim, dtype=k_cache.dtype, device=device)
    for splits in (1, 2):
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 1.0, num_splits=splits)
