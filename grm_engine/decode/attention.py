"""Paged attention for the decoder: store new K/V into pages, attend over a sequence's pages.

The reference path (plain PyTorch, runs everywhere) is the specification: `store_kv_reference`,
`attend_contiguous` (one sequence, keys in order) and `decode_attention_reference` (gather pages, then
attend). The Triton kernels in grm_engine.kernels.paged_attention must agree with it. Key j is visible
to a query at position i iff j <= i and, on a sliding-window layer, i - j < window (as transformers).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Everything a layer needs to find the pages of the sequences in this step (shared by all layers)."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64: page * block_size + offset where each new token's K/V goes
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0 past a sequence's blocks
    context_lens: torch.Tensor  # [B] int32: tokens with K/V after this step (cached + new)
    query_starts: list[int]  # [B + 1] prefill: sequence b's new tokens are rows query_starts[b]:[b + 1]
    num_cached: list[int]  # [B] prefill: tokens already in the pages before this step
    max_context_len: int
    num_splits: int | None = None  # decode: key splits per sequence, fixed by the caller (CUDA graphs); None: chosen here
    # prefill, for the varlen kernel (built once per step; None: prefill_attention builds them from the lists)
    query_starts_device: torch.Tensor | None = None  # [B + 1] int32, query_starts on the device
    num_cached_device: torch.Tensor | None = None  # [B] int32, num_cached on the device
    max_query_len: int | None = None  # the most new tokens of one sequence (sizes the kernel's grid)
    cascade: object | None = None  # decode: a CascadePlan when samples share prompt pages (rows grouped by prompt)


def attention_backend(device: torch.device) -> str:
    """GRM_ENGINE_BACKEND=reference|triton forces a path; otherwise Triton on CUDA, reference elsewhere."""
    forced = os.environ.get("GRM_ENGINE_BACKEND", "").strip().lower()
    if forced in ("reference", "triton"):
        return forced
    return "triton" if device.type == "cuda" else "reference"


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """k, v [T, kv_heads, D] -> k_cache, v_cache [num_blocks, block_size, kv_heads, D] at slot_mapping [T]."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    k_cache.view(num_blocks * block_size, kv_heads, head_dim)[slot_mapping] = k
    v_cache.view(num_blocks * block_size, kv_heads, head_dim)[slot_mapping] = v


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if attention_backend(k.device) == "triton":
        from grm_engine.kernels.paged_attention import store_kv_triton

        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def visible_keys(query_positions: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """[Tq, Tk] bool: key j visible to the query at query_positions[i]."""
    key_positions = torch.arange(num_keys, device=query_positions.device)
    visible = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        visible &= key_positions[None, :] > query_positions[:, None] - window
    return visible


def attend_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_position: int, scale: float,
                      window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One sequence. q [Tq, H, D] at positions first_position..; k, v [Tk, kv_heads, D] at positions 0..Tk-1.
    Returns [Tq, H, D]. Soft-capping (Gemma 2) is tanh(s / cap) * cap on the scaled scores."""
    num_queries, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, T, D]
    if softcap is None:  # SDPA reads each KV head for its whole query group (no repeated copies)
        if window is None and first_position == 0 and num_queries == k.shape[0]:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            positions = torch.arange(first_position, first_position + num_queries, device=q.device)
            visible = visible_keys(positions, k.shape[0], window)  # [Tq, Tk]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible, scale=scale, enable_gqa=group > 1)
        return out.transpose(0, 1)
    kh, vh = kh.repeat_interleave(group, dim=0), vh.repeat_interleave(group, dim=0)  # [H, Tk, D]
    positions = torch.arange(first_position, first_position + num_queries, device=q.device)
    visible = visible_keys(positions, k.shape[0], window)  # [Tq, Tk]
    scores = torch.einsum("hqd,hkd->hqk", qh.float(), kh.float()) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,hkd->hqd", probs, vh.float()).to(q.dtype).transpose(0, 1)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """cache [num_blocks, block_size, kv_heads, D], block_table [n] -> the first num_tokens rows [num_tokens, kv_heads, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:num_tokens]


def prefill_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, window=None, softcap=None):
    """q [T, H, D], k, v [T, kv_heads, D] (already stored in the pages) -> [T, H, D]: every sequence of the step in
    one launch of the varlen kernel on the Triton backend, else one sequence at a time (the reference)."""
    if attention_backend(q.device) != "triton":
        return prefill_attention_reference(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    from grm_engine.kernels.varlen_attention import varlen_prefill_attention

    query_starts, num_cached = meta.query_starts_device, meta.num_cached_device
    if query_starts is None or num_cached is None:
        query_starts = torch.tensor(meta.query_starts, dtype=torch.int32, device=q.device)
        num_cached = torch.tensor(meta.num_cached, dtype=torch.int32, device=q.device)
    return varlen_prefill_attention(q, k, v, k_cache, v_cache, meta.block_tables, query_starts, num_cached, scale,
                                    max_query_len=meta.max_query_len or longest_query(meta.query_starts),
                                    window=window, softcap=softcap, any_cached=any(meta.num_cached))


def longest_query(query_starts: list[int]) -> int:
    return max((end - start for start, end in zip(query_starts, query_starts[1:])), default=0)


def prefill_attention_reference(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale, window=None, softcap=None):
    """q [T, H, D], k, v [T, kv_heads, D] (already stored in the pages) -> [T, H, D], one sequence at a time."""
    out = torch.empty_like(q)
    for b in range(len(meta.num_cached)):
        start, end = meta.query_starts[b], meta.query_starts[b + 1]
        cached = meta.num_cached[b]
        if cached == 0:  # the chunk holds the whole context: no need to read the pages back
            keys, values = k[start:end], v[start:end]
        else:
            keys = gather_pages(k_cache, meta.block_tables[b], cached + end - start)
            values = gather_pages(v_cache, meta.block_tables[b], cached + end - start)
        out[start:end] = attend_contiguous(q[start:end], keys, values, cached, scale, window, softcap)
    return out


def decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale, window=None, softcap=None):
    """q [B, H, D], one query per sequence at position context_lens[b] - 1 -> [B, H, D] (fp32 math)."""
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    max_len = block_tables.shape[1] * block_size
    keys = k_cache[block_tables.long()].reshape(batch, max_len, kv_heads, head_dim).float()
    values = v_cache[block_tables.long()].reshape(batch, max_len, kv_heads, head_dim).float()
    qg = q.float().view(batch, kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, keys) * scale  # [B, kv_heads, group, max_len]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    positions = torch.arange(max_len, device=q.device)
    query_positions = (context_lens.long() - 1)[:, None]
    visible = positions[None, :] <= query_positions
    if window is not None:
        visible &= positions[None, :] > query_positions - window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, values)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale, window=None, softcap=None):
    if attention_backend(q.device) == "triton":
        if meta.cascade is not None and window is None and softcap is None:  # the shared-prefix kernel's scope
            from grm_engine.kernels.cascade_attention import cascade_decode_attention

            return cascade_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, None, None,
                                            scale, plan=meta.cascade)
        from grm_engine.kernels.paged_attention import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                      window=window, softcap=softcap, max_context_len=meta.max_context_len,
                                      num_splits=meta.num_splits)
    return decode_attention_reference(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, window, softcap)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
