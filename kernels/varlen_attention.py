"""Varlen paged prefill attention: every sequence of a prefill (or chunked-prefill) step in one launch. Queries are
packed [T, H, D] (sequence b's new tokens are rows query_starts[b]:query_starts[b + 1], at positions num_cached[b]
+ i); keys and values come from the paged cache through the block table (the step's own K/V are stored before
attention runs), so a prefix-cache hit, a chunk after the first and a fresh prompt are one code path. Causal,
GQA-packed (a program's query tile holds rows (token, head) of one KV head's whole group, token-major, so each K/V
tile is loaded once per group), optional sliding window and tanh soft-capping (Gemma 2); online softmax in fp32.
Traffic: Q and O once; each visible K/V tile once per query tile of a KV head (FLOPs dominate at prefill lengths).
Reference: grm_engine.decode.attention.prefill_attention_reference (per-sequence SDPA, or fp32 math with soft-capping).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from grm_engine.kernels.paged_attention import _tanh

LOG2E = 1.4426950408889634


@triton.jit
def _load_key_rows(ptr, table, start_row, t, t_mask, kv_head, d, d_mask, stride_b, stride_t, stride_h,
                   BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr):
    """[BLOCK_N, BLOCK_D] rows of one KV head at key positions t: from the pages (PAGED: `table` points at the
    sequence's block-table row; stride_b/t/h are the cache's page/offset/head strides) or, when nothing was cached
    before this step, straight from the packed k/v tensor (rows start_row + t; stride_t/h are its token/head strides)."""
    if PAGED:
        if MASKED:
            page = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        else:
            page = tl.load(table + t // BLOCK_SIZE).to(tl.int64)
        address = ptr + page[:, None] * stride_b + (t % BLOCK_SIZE)[:, None] * stride_t
    else:
        address = ptr + (start_row + t).to(tl.int64)[:, None] * stride_t
    address += kv_head * stride_h + d[None, :]
    if MASKED:
        return tl.load(address, mask=t_mask[:, None] & d_mask[None, :], other=0.0)
    return tl.load(address, mask=d_mask[None, :], other=0.0)


@triton.jit
def _attend_tiles(q, m, l, acc, key_start, key_end, valid_end, query_pos, table, start_row, k_ptr, v_ptr, kv_head,
                  d, d_mask, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, qk_scale, softcap, window,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr,
                  USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update over key tiles [key_start, key_end) (multiples of BLOCK_N from key_start) for query rows
    at query_pos [BLOCK_M]. MASKED tiles apply the causal / window mask and read no key at or past valid_end; the
    unmasked ones are visible to every row (the caller proves it). Scores live in the log2 domain (exp2)."""
    for tile in range(key_start, key_end, BLOCK_N):
        t = tile + tl.arange(0, BLOCK_N)  # key positions
        t_mask = t < valid_end
        k = _load_key_rows(k_ptr, table, start_row, t, t_mask, kv_head, d, d_mask, stride_kb, stride_kt, stride_kh,
                           BLOCK_SIZE, PAGED, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if USE_SOFTCAP:
            s = _tanh(s * qk_scale / softcap) * (softcap * 1.4426950408889634)
        else:
            s = s * (qk_scale * 1.4426950408889634)
        if MASKED:
            visible = (t[None, :] <= query_pos[:, None]) & t_mask[None, :]
            if USE_WINDOW:
                visible &= t[None, :] > query_pos[:, None] - window
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: keep it at 0
        else:
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = m_new
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = _load_key_rows(v_ptr, table, start_row, t, t_mask, kv_head, d, d_mask, stride_vb, stride_vt, stride_vh,
                           BLOCK_SIZE, PAGED, MASKED)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit
def _varlen_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, query_starts_ptr, num_cached_ptr,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_bt, qk_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    # Row tiles are counted from the end of the sequence: tile 0 (the one with the most keys) of every sequence and
    # head is launched first, so the long tiles do not trail at the end of the grid.
    tile_from_end = tl.program_id(2)
    start_row = tl.load(query_starts_ptr + seq)
    num_queries = tl.load(query_starts_ptr + seq + 1) - start_row
    row_end = num_queries * GROUP - tile_from_end * BLOCK_M
    if row_end <= 0:
        return
    row_start = row_end - BLOCK_M  # negative in a sequence's first tile: those rows are padding
    rows = tl.maximum(row_start + tl.arange(0, BLOCK_M), 0)  # [BLOCK_M] (token, head) rows, token-major
    row_mask = row_start + tl.arange(0, BLOCK_M) >= 0
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    num_cached = tl.load(num_cached_ptr + seq)
    query_pos = num_cached + token  # [BLOCK_M]
    first_pos = num_cached + tl.maximum(row_start, 0) // GROUP
    last_pos = num_cached + (row_end - 1) // GROUP

    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_rows = (start_row + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    # Keys [lo, hi) are visible to some row of the tile; [full_lo, full_hi) to every row (no mask needed there).
    hi = last_pos + 1
    full_hi = first_pos + 1
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
        full_lo = tl.maximum(last_pos - window + 1, 0)
        mid_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    else:
        lo = 0
        mid_lo = 0
    mid_hi = (full_hi // BLOCK_N) * BLOCK_N
    head_end = tl.minimum(mid_lo, hi)  # masked tiles [lo rounded down, head_end), unmasked [head_end, mid_end),
    mid_end = tl.maximum(mid_hi, head_end)  # masked again [mid_end, hi)

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt  # (unused on the packed path)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m, l, acc = _attend_tiles(q, m, l, acc, (lo // BLOCK_N) * BLOCK_N, head_end, hi, query_pos, table, start_row,
                              k_ptr, v_ptr, kv_head, d, d_mask, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                              stride_vh, qk_scale, softcap, window, BLOCK_SIZE, BLOCK_N, PAGED, True, USE_SOFTCAP,
                              USE_WINDOW, DOT_PRECISION)
    m, l, acc = _attend_tiles(q, m, l, acc, head_end, mid_end, hi, query_pos, table, start_row,
                              k_ptr, v_ptr, kv_head, d, d_mask, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                              stride_vh, qk_scale, softcap, window, BLOCK_SIZE, BLOCK_N, PAGED, False, USE_SOFTCAP,
                              USE_WINDOW, DOT_PRECISION)
    m, l, acc = _attend_tiles(q, m, l, acc, mid_end, hi, hi, query_pos, table, start_row,
                              k_ptr, v_ptr, kv_head, d, d_mask, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                              stride_vh, qk_scale, softcap, window, BLOCK_SIZE, BLOCK_N, PAGED, True, USE_SOFTCAP,
                              USE_WINDOW, DOT_PRECISION)
    out = acc / l[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # (token, head) query rows per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


# Per head_dim, for 2-byte inputs on sm_80/sm_90. First guesses from flash-attention Triton tunings (Q and the fp32
# accumulator in registers, K/V tiles pipelined through shared memory); bench/gpu_prefill.py times CANDIDATES on
# the GPU, and the winner goes here.
TILE_CONFIGS = {64: TileConfig(128, 64, 4, 3), 128: TileConfig(128, 64, 8, 3), 256: TileConfig(64, 64, 8, 2)}
CANDIDATES = {
    64: [TileConfig(128, 64, 4, 3), TileConfig(128, 128, 8, 3), TileConfig(64, 64, 4, 3)],
    128: [TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3), TileConfig(128, 64, 4, 3), TileConfig(64, 64, 4, 3)],
    256: [TileConfig(64, 64, 8, 2), TileConfig(64, 32, 4, 2), TileConfig(128, 32, 8, 2)],
}
# Reading a fresh prompt's keys from the packed k/v instead of the pages (no block-table lookups); bench: both timed.
PACKED_WHEN_UNCACHED = True


def tile_config(head_dim: int, dtype: torch.dtype) -> TileConfig:
    block_d = max(16, triton.next_power_of_2(head_dim))
    config = TILE_CONFIGS.get(block_d) or TileConfig(64, 32, 4, 2)
    if dtype == torch.float32 or block_d > 256:  # twice the bytes per tile: halve the key tile
        config = TileConfig(min(config.block_m, 64), max(16, config.block_n // 2), config.num_warps, 2)
    return config


def varlen_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, block_tables: torch.Tensor, query_starts: torch.Tensor,
                             num_cached: torch.Tensor, scale: float, *, max_query_len: int,
                             window: int | None = None, softcap: float | None = None, any_cached: bool = True,
                             config: TileConfig | None = None, packed_when_uncached: bool | None = None) -> torch.Tensor:
    """q [T, H, D] (any token stride); k, v [T, kv_heads, D] this step's keys/values, already stored in the caches
    [num_blocks, block_size, kv_heads, D]; block_tables [B, max_blocks] int32; query_starts [B + 1] int32 (sequence
    b's rows are query_starts[b]:[b + 1]); num_cached [B] int32 (tokens in the pages before this step, so row i of
    sequence b sits at position num_cached[b] + i). max_query_len: the longest sequence's new tokens (sizes the
    grid; the host already knows it; a smaller value would leave rows unwritten). any_cached False (every num_cached is 0) lets the kernel read k, v directly.
    Returns [T, H, D] in q's dtype."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    batch = num_cached.shape[0]
    if num_heads % kv_heads or k.shape[1:] != (kv_heads, head_dim) or v.shape != k.shape or k.shape[0] != num_tokens:
        raise ValueError(f"varlen_prefill_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         f"match the caches' {kv_heads} KV heads of size {head_dim}")
    if query_starts.dtype != torch.int32 or num_cached.dtype != torch.int32 or block_tables.dtype != torch.int32:
        raise ValueError("varlen_prefill_attention: query_starts, num_cached and block_tables must be int32 tensors")
    if query_starts.shape != (batch + 1,) or block_tables.shape[0] != batch:
        raise ValueError(f"varlen_prefill_attention: {batch} sequences (num_cached) but query_starts "
                         f"{tuple(query_starts.shape)} and block_tables {tuple(block_tables.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("varlen_prefill_attention: head_dim must be the contiguous dimension of q, k, v and the caches")
    if window is not None and window < 1:
        raise ValueError(f"varlen_prefill_attention: window must be >= 1, got {window}")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or max_query_len == 0:
        return out
    config = config or tile_config(head_dim, q.dtype)
    group = num_heads // kv_heads
    packed = not any_cached and (PACKED_WHEN_UNCACHED if packed_when_uncached is None else packed_when_uncached)
    if packed:  # keys by token row of k, v: the page strides are unused
        key_strides = (0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1))
        k_src, v_src = k, v
    else:
        key_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                       v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
        k_src, v_src = k_cache, v_cache
    grid = (kv_heads, batch, triton.cdiv(max_query_len * group, config.block_m))
    _varlen_prefill_kernel[grid](
        q, k_src, v_src, out, block_tables, query_starts, num_cached,
        q.stride(0), q.stride(1), *key_strides, out.stride(0), out.stride(1), block_tables.stride(0),
        float(scale), float(softcap or 1.0), int(window or 0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGED=not packed, USE_SOFTCAP=softcap is not None,
        USE_WINDOW=window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32 rounding)
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
