"""Paged KV cache kernels: store new K/V rows into their pages; decode attention (one query per sequence)
over a sequence's pages, GQA-aware (one program serves every query head of a KV head) and split over long
contexts (partial results merged by log-sum-exp). Traffic: each page of K and V is read once per KV head
per sequence. Reference: grm_engine.decode.attention (store_kv_reference, decode_attention_reference).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:  # negative slots are padding
        offsets = tl.arange(0, BLOCK)
        mask = offsets < ROW
        k = tl.load(k_ptr + token * stride_k + offsets, mask=mask)
        v = tl.load(v_ptr + token * stride_v + offsets, mask=mask)
        tl.store(k_cache_ptr + slot * ROW + offsets, k, mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offsets, v, mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """k, v [T, kv_heads, D] -> caches [num_blocks, block_size, kv_heads, D] (contiguous) at slot_mapping [T]."""
    num_tokens, kv_heads, head_dim = k.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "store_kv_triton: caches must be contiguous"
    assert k.stride(2) == 1 and k.stride(1) == head_dim and v.stride(2) == 1 and v.stride(1) == head_dim, \
        "store_kv_triton: each token's [kv_heads, D] rows must be contiguous"
    if num_tokens == 0:
        return
    row = kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    ROW=row, BLOCK=triton.next_power_of_2(row))


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _attend_key_tile(q, m, l, acc, table, tile, end, k_cache_ptr, v_cache_ptr, kv_head, d, d_mask,
                     stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, softcap,
                     BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_SOFTCAP: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One tile of BLOCK_N keys [tile, min(tile + BLOCK_N, end)) of one KV head, found through a sequence's block
    table (`table` points at its row), for query rows q [R, BLOCK_D]: the online-softmax update of the running max
    m [R], sum l [R] and unnormalized output acc [R, BLOCK_D] (flash decoding). Shared with the cascade kernel."""
    t = tile + tl.arange(0, BLOCK_N)  # token positions
    t_mask = t < end
    page = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
    offset = t % BLOCK_SIZE
    kv_mask = t_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + page[:, None] * stride_kb + offset[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [R, BLOCK_N] fp32
    if USE_SOFTCAP:
        s = _tanh(s / softcap) * softcap
    s = tl.where(t_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds a visible key
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    v = tl.load(v_cache_ptr + page[:, None] * stride_vb + offset[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
                mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, partial_ptr, stats_ptr,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    scale, softcap, window, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_HEADS: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    batch = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + batch)
    query_pos = context_len - 1
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(query_pos - window + 1, 0)
    # Each sequence splits its own visible span [lo, context_len) into num_splits pieces of whole key tiles, so
    # the split points depend only on its own length (and num_splits), not on the longest sequence of the batch,
    # and the grid does not depend on any length at all (a CUDA graph can freeze it). Empty splits store (-inf, 0).
    tokens_per_split = tl.cdiv(tl.cdiv(context_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * tokens_per_split
    end = tl.minimum(context_len, start + tokens_per_split)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kv_head * GROUP + g  # [BLOCK_G] query heads served by this KV head
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + batch * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + batch * stride_bt
    for tile in range(start, end, BLOCK_N):
        m, l, acc = _attend_key_tile(q, m, l, acc, table, tile, end, k_cache_ptr, v_cache_ptr, kv_head, d, d_mask,
                                     stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, softcap,
                                     BLOCK_SIZE, BLOCK_N, USE_SOFTCAP, DOT_PRECISION)

    out_mask = g_mask[:, None] & d_mask[None, :]
    if SINGLE_SPLIT:
        out = acc / l[:, None]
        tl.store(out_ptr + batch * NUM_HEADS * HEAD_DIM + head[:, None] * HEAD_DIM + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partial [B, H, num_splits, D] unnormalized; stats [B, H, num_splits, 2] = (max, sum of exp)
        row = (batch * NUM_HEADS + head) * num_splits + split  # [BLOCK_G]
        tl.store(partial_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
        tl.store(stats_ptr + row * 2, m, mask=g_mask)
        tl.store(stats_ptr + row * 2 + 1, l, mask=g_mask)


@triton.jit
def _merge_splits_kernel(partial_ptr, stats_ptr, out_ptr, num_splits, HEAD_DIM: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # batch * NUM_HEADS + head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    m = tl.load(stats_ptr + (row * num_splits + s) * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(stats_ptr + (row * num_splits + s) * 2 + 1, mask=s_mask, other=0.0)
    m_all = tl.max(m, axis=0)
    weight = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # empty splits have m = -inf
    acc = tl.load(partial_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                  mask=s_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Split-K launch of the decode kernel (bench/gpu_decode_splits.py): programs per SM wanted, fewest keys per split,
# keys per tile (None: 64, or 128 for head_dim >= 256, where the Gemma 2 2B decode step went from 5.53 to
# 5.20 ms on the H200; at head_dim 64 (Qwen2.5-0.5B) 128 changed nothing: 1.29 vs 1.31 ms).
SPLIT_WAVES = 2
SPLIT_MIN_TOKENS = 256
DECODE_BLOCK_N = None


def choose_num_splits(batch: int, kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU SPLIT_WAVES times over, but at least SPLIT_MIN_TOKENS keys per split."""
    if device.type != "cuda":
        return max(1, min(4, -(-max_context_len // 256)))
    sms = _num_sms(device)
    wanted = -(-SPLIT_WAVES * sms // max(batch * kv_heads, 1))
    return max(1, min(wanted, -(-max_context_len // SPLIT_MIN_TOKENS), 64))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, *, window: int | None = None,
                           softcap: float | None = None, max_context_len: int | None = None,
                           num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, kv_heads, D]; block_tables [B, max_blocks] int32;
    context_lens [B] int32 (the query sits at position context_lens[b] - 1). Returns [B, H, D] in q's dtype.
    num_splits: key splits per sequence (default from the batch and max_context_len; given, the host reads
    nothing from the device, as inside a CUDA graph)."""
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    block_n = block_n or DECODE_BLOCK_N or (128 if head_dim >= 256 else 64)
    assert num_heads % kv_heads == 0, f"paged_decode_attention: {num_heads} query heads for {kv_heads} KV heads"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    if num_splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max())
        num_splits = choose_num_splits(batch, kv_heads, max_context_len, q.device)
    group = num_heads // kv_heads
    out = torch.empty(batch, num_heads, head_dim, device=q.device, dtype=q.dtype)
    partial = stats = out
    if num_splits > 1:
        partial = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        stats = torch.empty(batch, num_heads, num_splits, 2, device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _paged_decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, partial, stats,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        float(scale), float(softcap or 1.0), int(window or 0), num_splits,
        GROUP=group, HEAD_DIM=head_dim, NUM_HEADS=num_heads, SINGLE_SPLIT=num_splits == 1, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32 rounding)
        num_warps=4 if block_d <= 128 else 8,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch * num_heads,)](partial, stats, out, num_splits, HEAD_DIM=head_dim,
                                                   BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d)
    return out
