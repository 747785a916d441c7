"""Multi-head latent attention (DeepSeek-V2 MLA) decode over paged latent KV: each cached token is one row
[c (kv_lora_rank), k_pe (qk_rope_head_dim)] shared by every head; the query arrives with the key up-projection
absorbed (q = [W_uk^T q_nope, q_pe], [B, H, R + P]), so a score is q . row and the output is the latent
sum_t p_t c_t ([B, H, R]; the caller applies W_uv). One program serves all heads of a sequence (a split of its
keys), so each latent page is read once per sequence and split; splits merge by log-sum-exp.
Traffic: context_len * (R + P) * dtype bytes per sequence, plus fp32 partials of num_splits * H * R.
Reference: grm_engine.decode.models.mla (store_latent_reference, mla_decode_reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from grm_engine.kernels.paged_attention import _merge_splits_kernel, choose_num_splits

MLA_BLOCK_N = 32  # keys per tile: a [32, 512] bf16 latent tile is 32 KiB of shared memory


@triton.jit
def _store_latent_kernel(latent_ptr, cache_ptr, slot_ptr, stride_l, ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # negative slots are padding rows of a CUDA-graph step
        offsets = tl.arange(0, BLOCK)
        mask = offsets < ROW
        row = tl.load(latent_ptr + token * stride_l + offsets, mask=mask)
        tl.store(cache_ptr + slot * ROW + offsets, row, mask=mask)


def store_latent_triton(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent [T, R + P] -> cache [num_blocks, block_size, 1, R + P] (contiguous) at slot_mapping [T]."""
    num_tokens, row = latent.shape
    assert cache.is_contiguous() and cache.shape[-1] == row and latent.stride(1) == 1, "store_latent_triton: layout"
    if num_tokens:
        _store_latent_kernel[(num_tokens,)](latent, cache, slot_mapping, latent.stride(0), ROW=row,
                                            BLOCK=triton.next_power_of_2(row))


@triton.jit
def _mla_decode_kernel(
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, partial_ptr, stats_ptr,
    stride_qb, stride_qh, stride_cb, stride_ct, stride_bt, scale, num_splits,
    NUM_HEADS: tl.constexpr, LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    batch = tl.program_id(0)
    split = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + batch)
    # a sequence's split points depend on its own length only (as the paged kernel: graph-safe, batch-invariant)
    tokens_per_split = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(context_len, start + tokens_per_split)

    h = tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    h_mask = h < NUM_HEADS
    r_mask = r < LATENT
    p_mask = p < ROPE
    q_row = q_ptr + batch * stride_qb + h[:, None] * stride_qh
    q_latent = tl.load(q_row + r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
    q_rope = tl.load(q_row + LATENT + p[None, :], mask=h_mask[:, None] & p_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_P]

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    table = block_tables_ptr + batch * stride_bt
    for tile in range(start, end, BLOCK_N):
        t = tile + tl.arange(0, BLOCK_N)
        t_mask = t < end
        page = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        row = cache_ptr + page * stride_cb + (t % BLOCK_SIZE) * stride_ct  # [BLOCK_N] pointers to latent rows
        c = tl.load(row[:, None] + r[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        k_rope = tl.load(row[:, None] + LATENT + p[None, :], mask=t_mask[:, None] & p_mask[None, :], other=0.0)
        s = tl.dot(q_latent, tl.trans(c), input_precision=DOT_PRECISION)
        s = tl.dot(q_rope, tl.trans(k_rope), s, input_precision=DOT_PRECISION) * scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds a visible key
        alpha = tl.exp(m - m_new)
        probs = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(c.dtype), c, input_precision=DOT_PRECISION)
        m = m_new

    out_mask = h_mask[:, None] & r_mask[None, :]
    if SINGLE_SPLIT:
        tl.store(out_ptr + (batch * NUM_HEADS + h[:, None]) * LATENT + r[None, :],
                 (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:  # partial [B, H, num_splits, R] unnormalized; stats [B, H, num_splits, 2] = (max, sum of exp)
        slot = (batch * NUM_HEADS + h) * num_splits + split  # [BLOCK_H]
        tl.store(partial_ptr + slot[:, None] * LATENT + r[None, :], acc, mask=out_mask)
        tl.store(stats_ptr + slot * 2, m, mask=h_mask)
        tl.store(stats_ptr + slot * 2 + 1, l, mask=h_mask)


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         scale: float, latent_dim: int, *, max_context_len: int | None = None,
                         num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """q [B, H, R + P] (absorbed query); cache [num_blocks, block_size, 1, R + P]; block_tables [B, max_blocks] int32;
    context_lens [B] int32 (the query sits at position context_lens[b] - 1). Returns the latent output [B, H, R]
    in q's dtype. num_splits given: nothing is read from the device (CUDA graphs)."""
    batch, num_heads, row = q.shape
    _, block_size, _, cache_row = cache.shape
    rope = row - latent_dim
    assert cache_row == row and rope > 0, f"mla_decode_attention: query rows of {row} for cache rows of {cache_row}"
    assert q.stride(2) == 1 and cache.stride(3) == 1, "mla_decode_attention: rows must be contiguous"
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    if num_splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max())
        num_splits = choose_num_splits(batch, 1, max_context_len, q.device)
    out = torch.empty(batch, num_heads, latent_dim, device=q.device, dtype=q.dtype)
    partial = stats = out
    if num_splits > 1:
        partial = torch.empty(batch, num_heads, num_splits, latent_dim, device=q.device, dtype=torch.float32)
        stats = torch.empty(batch, num_heads, num_splits, 2, device=q.device, dtype=torch.float32)
    block_r = max(16, triton.next_power_of_2(latent_dim))
    _mla_decode_kernel[(batch, num_splits)](
        q, cache, block_tables, context_lens, out, partial, stats,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0), float(scale), num_splits,
        NUM_HEADS=num_heads, LATENT=latent_dim, ROPE=rope, BLOCK_SIZE=block_size,
        BLOCK_H=max(16, triton.next_power_of_2(num_heads)), BLOCK_R=block_r, BLOCK_P=max(16, triton.next_power_of_2(rope)),
        BLOCK_N=block_n or MLA_BLOCK_N, SINGLE_SPLIT=num_splits == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4 if block_r <= 256 else 8,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch * num_heads,)](partial, stats, out, num_splits, HEAD_DIM=latent_dim,
                                                   BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_r)
    return out
