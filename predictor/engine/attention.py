"""Attention over the paged KV cache, plugged into transformers models as an attention implementation.

A step's tokens arrive packed in one row, [1, T]: first the prefill chunks (query length > 1), then the decodes
(query length 1). PagedKVCache.update writes each token's keys and values into its slot; the attention
function then reads every sequence's context from its blocks:
- prefill chunks one by one with torch's SDPA (causal; a chunk after cached context gathers that context);
- on the CPU, decodes that share a prefix's blocks read it once together (cascade_attention.py), and the rest
  go together through a C kernel that reads their blocks in place (cpu_decode_attention.py). Without a C
  compiler they are attended one by one like prefill chunks: one small SDPA per sequence over its gathered
  context beats one batched SDPA over contexts gathered and padded to the longest (101 -> 53 ms per step at 32
  decodes of 300 tokens);
- on CUDA, decodes together, with the Triton kernel or, without Triton, by gathering their blocks for one
  batched SDPA. The Triton path reads lengths and block tables from device tensors only, so it can be captured
  in a CUDA graph.

Models whose attention does not go through transformers' AttentionInterface (Falcon) use the mask layout
instead: PagedKVCache.update returns the gathered context, and the runner passes a 4D mask (see model_runner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from predictor.engine import cpu_decode_attention
from predictor.engine.cascade_attention import CascadePlan, cascade_decode_attention
from predictor.engine.cpu_decode_attention import CpuDecodes

PAGED_ATTENTION = "predictor_paged"


@dataclass
class AttentionMetadata:
    """Where a step's tokens go in the cache and what each sequence attends to.

    Host lists describe the chunks attended one by one (looped over in Python: prefill chunks, and on the CPU the
    decodes too); the batched decodes' fields are device tensors, so that a captured graph can be replayed with
    new contents.
    """

    cache: Any  # the PagedKVCache the step reads (PagedKVCache.slot_mapping says where the step writes)
    chunk_query_starts: list[int]  # [C + 1] offsets of the looped chunks in T
    chunk_seq_lens: list[int]  # [C] context length after the chunk
    chunk_block_tables: list[torch.Tensor]  # [C] the blocks of each chunk's sequence
    decode_start: int  # batched decodes are tokens [decode_start, T)
    decode_seq_lens: torch.Tensor  # [D] context length, including the token being decoded
    decode_block_tables: torch.Tensor  # [D, max_blocks]
    decode_max_len: int | None  # host copy of max(decode_seq_lens) for the gathering path; None: not known on the host
    use_triton: bool = False
    cascade: CascadePlan | None = None  # decodes that share a prefix, attended by groups (CPU)
    cpu_decodes: CpuDecodes | None = None  # the batched decodes outside cascade groups, for the CPU kernel

    @property
    def num_decodes(self) -> int:
        return self.decode_seq_lens.shape[0]


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached entries, [length, kv_heads, head_dim]."""
    blocks = cache.index_select(0, block_table[: -(-length // cache.shape[1])])
    return blocks.flatten(0, 1)[:length]


def chunked_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    """Causal attention of each looped chunk over its cached context and itself. Tensors are [T, heads, dim]."""
    starts = meta.chunk_query_starts
    grouped = meta.cascade.chunks if meta.cascade else frozenset()
    for i, seq_len in enumerate(meta.chunk_seq_lens):
        if i in grouped:
            continue
        start, end = starts[i], starts[i + 1]
        query_len = end - start
        query = q[start:end].transpose(0, 1)[None]
        if seq_len == query_len:  # a whole prompt: its keys are the ones just computed
            keys, values = k_new[start:end], v_new[start:end]
            mask, causal = None, True
        else:
            keys = gather_context(k_cache, meta.chunk_block_tables[i], seq_len)
            values = gather_context(v_cache, meta.chunk_block_tables[i], seq_len)
            mask, causal = None, False  # one query (a decode) sees its whole context
            if query_len > 1:
                positions = torch.arange(seq_len - query_len, seq_len, device=q.device)
                mask = torch.arange(seq_len, device=q.device)[None, :] <= positions[:, None]
        attended = F.scaled_dot_product_attention(
            query, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
            scale=scale, enable_gqa=True,
        )
        out[start:end] = attended[0].transpose(0, 1)


def decode_attention_gathered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decodes [D, heads, dim] over their blocks, gathered into one padded batch for SDPA."""
    tables = meta.decode_block_tables
    if meta.decode_max_len is not None:  # else captured: every column, since no host value may bound them
        tables = tables[:, : -(-meta.decode_max_len // k_cache.shape[1])]
    keys = k_cache[tables].flatten(1, 2)  # [D, num_blocks * block_size, kv_heads, dim]
    values = v_cache[tables].flatten(1, 2)
    visible = torch.arange(keys.shape[1], device=q.device)[None, :] < meta.decode_seq_lens[:, None]
    attended = F.scaled_dot_product_attention(
        q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible[:, None, None, :],
        scale=scale, enable_gqa=True,
    )
    return attended[:, :, 0]


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            attention_metadata: AttentionMetadata | None = None, **kwargs):
    """transformers' attention-function signature: query [1, heads, T, dim], key/value the step's new ones."""
    if attention_metadata is None:  # a plain forward (embeddings): no cache involved
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    meta = attention_metadata
    k_cache, v_cache = meta.cache.layer(module.layer_idx)
    q = query[0].transpose(0, 1)  # [T, heads, dim]
    out = torch.empty_like(q)
    if meta.chunk_seq_lens:
        chunked_attention(q, key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, meta, scaling, out)
    if meta.cascade:
        cascade_decode_attention(q, k_cache, v_cache, meta.cascade, scaling, out)
    if meta.num_decodes:
        decodes = q[meta.decode_start:]
        if meta.use_triton:
            from predictor.engine.triton_attention import paged_decode_attention

            out[meta.decode_start:] = paged_decode_attention(decodes, k_cache, v_cache, meta.decode_block_tables,
                                                             meta.decode_seq_lens, scaling)
        elif meta.cpu_decodes is not None:
            if meta.cpu_decodes.count:
                cpu_decode_attention.paged_decode_attention(q, k_cache, v_cache, meta.cpu_decodes, scaling, out)
        else:
            out[meta.decode_start:] = decode_attention_gathered(decodes, k_cache, v_cache, meta, scaling)
    return out[None], None


AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
