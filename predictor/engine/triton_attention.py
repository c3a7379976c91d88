"""Decode attention straight from the paged KV cache, as a Triton kernel (CUDA; the tests run it interpreted).

One program per (sequence, KV head) computes the attention of all query heads that share that KV head (GQA)
over the sequence's blocks with an online softmax, so each cached key and value is read once per step. Lengths
and block tables are read from device tensors: nothing depends on host values, and the launch can be captured
in a CUDA graph. A sequence of length 0 (a padded row of a captured batch) yields zeros.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attend_block(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head, block_index, seq_len, scale,
                  best, total, acc, stride_kb, stride_kt, stride_kh, stride_bt,
                  dims, dim_ok, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one block of keys and values into the running (max, sum, weighted values) of the online softmax."""
    tokens = tl.arange(0, BLOCK_SIZE)
    block = tl.load(block_tables_ptr + seq * stride_bt + block_index)
    visible = block_index * BLOCK_SIZE + tokens < seq_len
    offsets = block * stride_kb + tokens[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
    kv_mask = visible[:, None] & dim_ok[None, :]
    k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [GROUP_PAD, BLOCK_SIZE]
    scores = tl.where(visible[None, :], scores, float("-inf"))
    new_best = tl.maximum(best, tl.max(scores, axis=1))
    weights = tl.exp(scores - new_best[:, None])
    rescale = tl.exp(best - new_best)
    total = total * rescale + tl.sum(weights, axis=1)
    acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    return new_best, total, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dim_ok = dims < HEAD_DIM

    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    seq_len = tl.load(seq_lens_ptr + seq)
    best = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    total = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    if INTERPRETED:  # the interpreter cannot take a loaded value as a range() bound
        block_index = 0
        while block_index * BLOCK_SIZE < seq_len:
            best, total, acc = _attend_block(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head,
                                             block_index, seq_len, scale, best, total, acc, stride_kb, stride_kt,
                                             stride_kh, stride_bt, dims, dim_ok, BLOCK_SIZE, PRECISION)
            block_index += 1
    else:
        for block_index in range(0, tl.cdiv(seq_len, BLOCK_SIZE)):
            best, total, acc = _attend_block(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, kv_head,
                                             block_index, seq_len, scale, best, total, acc, stride_kb, stride_kt,
                                             stride_kh, stride_bt, dims, dim_ok, BLOCK_SIZE, PRECISION)
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, heads, dim]; caches [blocks, block_size, kv_heads, dim]; block_tables [B, max_blocks]; seq_lens [B].
    Returns [B, heads, dim]."""
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRETED=INTERPRETED,  # fp32 stays fp32
    )
    return out
