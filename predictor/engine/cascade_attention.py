"""Cascade attention on the CPU: decodes that share a prefix read its keys and values once, not once each.

With prefix caching, requests that open with the same system prompt, and a request's n choices, hold the same
physical blocks for their common prefix. Attending each decode over its own gathered context copies and reads that
prefix once per sequence and layer (64 decodes sharing 1,500 tokens: 84 ms per layer of the demo model). vLLM's
cascade attention reads it once for them all: one attention of every member's query over the shared prefix, one of
each member over its own tail, merged by their log-sum-exps (8 ms).

plan_cascade() groups a step's decodes on the host, once per step; cascade_decode_attention() runs each layer.
Decodes in no group are attended one by one as before (attention.chunked_attention).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from predictor.engine.block_manager import SCRATCH_BLOCK

# Sharing fewer blocks than this, or by one sequence alone, is cheaper attended one by one.
MIN_SHARED_BLOCKS = 4

# torch's fused CPU attention, which also returns each row's log-sum-exp: what merging two partial attentions needs.
_attention_with_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass
class PrefixGroup:
    """Decodes whose block tables open with the same blocks."""

    rows: torch.Tensor  # [n] the decodes' positions in the step's tokens
    prefix: slice | torch.Tensor  # the shared blocks: a slice when their ids run consecutively (read in place)
    tail_tables: torch.Tensor  # [n, width] each member's blocks after the prefix, padded with the scratch block
    tail_mask: torch.Tensor  # [n, 1, 1, width * block_size] 0 where a tail's key is real, -inf past its end


@dataclass
class CascadePlan:
    groups: list[PrefixGroup]
    chunks: frozenset[int]  # the looped chunks (attention.AttentionMetadata) the groups attend


def plan_cascade(block_tables: list[list[int]], seq_lens: list[int], chunk_starts: list[int], first_decode: int,
                 block_size: int, dtype: torch.dtype) -> CascadePlan | None:
    """Groups of at least two decodes (chunks from first_decode on, each one token at chunk_starts[i]) that share
    at least MIN_SHARED_BLOCKS leading blocks; None when there are none. Only full blocks before a decode's last
    one can be shared: the last holds the token being written."""
    by_first_block = defaultdict(list)
    for i in range(first_decode, len(seq_lens)):
        if (seq_lens[i] - 1) // block_size >= MIN_SHARED_BLOCKS:
            by_first_block[block_tables[i][0]].append(i)
    groups, chunks = [], []
    for members in by_first_block.values():
        if len(members) < 2:
            continue
        shared = min((seq_lens[i] - 1) // block_size for i in members)
        first = block_tables[members[0]]
        for i in members[1:]:
            table = block_tables[i]
            shared = next((b for b in range(shared) if table[b] != first[b]), shared)
        if shared < MIN_SHARED_BLOCKS:
            continue
        groups.append(_group([chunk_starts[i] for i in members], first[:shared],
                             [block_tables[i][shared : -(-seq_lens[i] // block_size)] for i in members],
                             [seq_lens[i] - shared * block_size for i in members], block_size, dtype))
        chunks += members
    return CascadePlan(groups, frozenset(chunks)) if groups else None


def _group(rows: list[int], prefix: list[int], tails: list[list[int]], tail_lens: list[int], block_size: int,
           dtype: torch.dtype) -> PrefixGroup:
    consecutive = prefix == list(range(prefix[0], prefix[0] + len(prefix)))
    width = max(len(tail) for tail in tails)
    tables = torch.tensor([[*tail, *[SCRATCH_BLOCK] * (width - len(tail))] for tail in tails])
    visible = torch.arange(width * block_size)[None, :] < torch.tensor(tail_lens)[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return PrefixGroup(torch.tensor(rows), slice(prefix[0], prefix[0] + len(prefix)) if consecutive
                       else torch.tensor(prefix), tables, mask[:, None, None, :])


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: CascadePlan,
                             scale: float, out: torch.Tensor) -> None:
    """Each group's decodes: q and out are [T, heads, dim], the caches [blocks, block_size, kv_heads, dim]."""
    kv_heads = k_cache.shape[2]
    for group in plan.groups:
        queries = q[group.rows]
        n, heads, dim = queries.shape
        per_kv = queries.view(n, kv_heads, heads // kv_heads, dim)  # a KV head's query heads as query rows
        prefix_out, prefix_lse = _over_prefix(per_kv, _blocks(k_cache, group.prefix), _blocks(v_cache, group.prefix),
                                              scale)
        tail_out, tail_lse = _attention_with_lse(per_kv, _tail(k_cache, group.tail_tables),
                                                 _tail(v_cache, group.tail_tables), attn_mask=group.tail_mask,
                                                 scale=scale)
        out[group.rows] = _merge(prefix_out, prefix_lse, tail_out, tail_lse).reshape(n, heads, dim).to(out.dtype)


def _blocks(cache: torch.Tensor, blocks: slice | torch.Tensor) -> torch.Tensor:
    """[tokens, kv_heads, dim] of whole blocks: a view for a slice, a copy for ids."""
    chosen = cache[blocks] if isinstance(blocks, slice) else cache.index_select(0, blocks)
    return chosen.flatten(0, 1)


def _tail(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[n, kv_heads, width * block_size, dim]."""
    return cache[tables].flatten(1, 2).transpose(1, 2)


def _over_prefix(per_kv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """Every member's queries over the shared keys in one attention: the members' query rows side by side."""
    n, kv_heads, group, dim = per_kv.shape
    rows = per_kv.permute(1, 0, 2, 3).reshape(1, kv_heads, n * group, dim)
    out, lse = _attention_with_lse(rows, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], scale=scale)
    return (out[0].view(kv_heads, n, group, dim).permute(1, 0, 2, 3),
            lse[0].view(kv_heads, n, group).permute(1, 0, 2))


def _merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over keys A and B together from attention over each: weighted by each part's softmax mass."""
    top = torch.maximum(lse_a, lse_b)
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    merged = out_a.float() * weight_a[..., None] + out_b.float() * weight_b[..., None]
    return merged / (weight_a + weight_b)[..., None]
