"""Multi-head latent attention (DeepSeek-V2 MLA) decode over paged latent KV: each cached token is one row
[c (kv_lora_rank), k_pe (qk_rope_head_dim)] shared by every head; the query arrives with the key up-projection
absorbed (q = [W_uk^T q_nope, q_pe], [B, H, R + P]), so a score is q . row and the output is the latent
sum_t p_t c_t ([B, H, R]; the caller applies W_uv). One program serves all heads of a sequence (a split of its
keys), so each latent page is read once per sequence and split; splits merge by log-sum-exp.
Traffic: context_len * (R + P) * dtype bytes per sequence, plus fp32 partials of num_splits * H * R.
Shared prefix (mla_cascade_decode_attention): the samples of a prompt read its shared latent pages once per row
tile of block_m stacked (sample, head) rows (MQA with every head on the one latent row), their private pages
once per sample, on cascade_attention's work lists and merge order; fp32 partials of prefix splits * H * R per
sequence (written, then read by the suffix kernel, which merges when the suffix is one split).
Reference: grm_engine.decode.models.mla (store_latent_reference, mla_decode_reference, mla_cascade_decode_reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from grm_engine.kernels.cascade_attention import (_finish_rows, _merge_slots_kernel, _work_item, plan_cascade,
                                                  workspace_numel)
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
def _attend_latent_tile(q_latent, q_rope, m, l, acc, table, tile, end, cache_ptr, stride_cb, stride_ct,
                        r, r_mask, p, p_mask, scale, LATENT: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of BLOCK_N latent rows [tile, min(tile + BLOCK_N, end)), found through a sequence's block table
    (`table` points at its row), for query rows q_latent [M, BLOCK_R], q_rope [M, BLOCK_P]: score = q . row over
    R + P, value = the row's first R columns; the online-softmax update of m [M], l [M], acc [M, BLOCK_R]."""
    t = tile + tl.arange(0, BLOCK_N)
    t_mask = t < end
    page = tl.load(table + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
    row = cache_ptr + page * stride_cb + (t % BLOCK_SIZE) * stride_ct  # [BLOCK_N] pointers to latent rows
    c = tl.load(row[:, None] + r[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
    k_rope = tl.load(row[:, None] + LATENT + p[None, :], mask=t_mask[:, None] & p_mask[None, :], other=0.0)
    s = tl.dot(q_latent, tl.trans(c), input_precision=DOT_PRECISION)
    s = tl.dot(q_rope, tl.trans(k_rope), s, input_precision=DOT_PRECISION) * scale  # [M, BLOCK_N]
    s = tl.where(t_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds a visible key
    alpha = tl.exp(m - m_new)
    probs = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(c.dtype), c, input_precision=DOT_PRECISION)
    return m_new, l, acc


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
        m, l, acc = _attend_latent_tile(q_latent, q_rope, m, l, acc, table, tile, end, cache_ptr, stride_cb, stride_ct,
                                        r, r_mask, p, p_mask, scale, LATENT, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)

    out_mask = h_mask[:, None] & r_mask[None, :]
    if SINGLE_SPLIT:
        tl.store(out_ptr + (batch * NUM_HEADS + h[:, None]) * LATENT + r[None, :],
                 (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:  # partial [B, H, num_splits, R] unnormalized; stats [B, H, num_splits, 2] = (max, sum of exp)
        slot = (batch * NUM_HEADS + h) * num_splits + split  # [BLOCK_H]
        tl.store(partial_ptr + slot[:, None] * LATENT + r[None, :], acc, mask=out_mask)
        tl.store(stats_ptr + slot * 2, m, mask=h_mask)
        tl.store(stats_ptr + slot * 2 + 1, l, mask=h_mask)


def _check_mla_inputs(name, q, cache, block_tables, context_lens, latent_dim: int) -> tuple[int, int, int, int]:
    """The launchers' shared contract -> (batch, num_heads, block_size, rope dim)."""
    batch, num_heads, row = q.shape
    _, block_size, _, cache_row = cache.shape
    rope = row - latent_dim
    assert cache_row == row and rope > 0, f"{name}: query rows of {row} for cache rows of {cache_row}"
    assert q.stride(2) == 1 and cache.stride(3) == 1, f"{name}: rows must be contiguous"
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32
    return batch, num_heads, block_size, rope


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         scale: float, latent_dim: int, *, max_context_len: int | None = None,
                         num_splits: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """q [B, H, R + P] (absorbed query); cache [num_blocks, block_size, 1, R + P]; block_tables [B, max_blocks] int32;
    context_lens [B] int32 (the query sits at position context_lens[b] - 1). Returns the latent output [B, H, R]
    in q's dtype. num_splits given: nothing is read from the device (CUDA graphs)."""
    batch, num_heads, block_size, rope = _check_mla_inputs("mla_decode_attention", q, cache, block_tables, context_lens,
                                                           latent_dim)
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


# ----------------------------------------------------------------------------------------------- shared prefix
@triton.jit
def _mla_stacked_rows_kernel(
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, prefix_tokens_ptr, items_ptr, partial_ptr, stats_ptr,
    out_ptr, stride_qb, stride_qh, stride_cb, stride_ct, stride_bt, scale, split_tokens, num_slots,
    NUM_HEADS: tl.constexpr, LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_SUFFIX: tl.constexpr, FUSE_MERGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M stacked query rows (sample-major, then head; the latent row is every head's one KV
    head) against latent rows [token_start, token_end) of the first sample's block table; writes unnormalized
    partials [B, H, num_slots, R] + (max, sum) in the layout of cascade_attention's merge. FUSE_MERGE (the suffix
    grid with one split, after the prefix kernel): merges the prefix slots with its own registers in the merge
    kernel's order (prefix slots, then the suffix: bitwise its result) and writes the output [B, H, R] instead."""
    # suffix grid (B, num_suffix_splits): one sample's private pages, all its heads; prefix grid (num_items,)
    first_sample, num_samples, first_row, token_start, token_end, slot, prefix_len = _work_item(
        items_ptr, prefix_tokens_ptr, context_lens_ptr, tl.program_id(0), tl.program_id(1), split_tokens, IS_SUFFIX)

    i = first_row + tl.arange(0, BLOCK_M)
    # A program without rows (a no-op item padding a graph's list, a suffix split past the suffix) loads and stores
    # nothing; fused, every head of the sample writes its output (from the prefix slots alone if the suffix is empty).
    row_mask = i < (NUM_HEADS if FUSE_MERGE else num_samples * NUM_HEADS)
    sample = (first_sample + i // NUM_HEADS).to(tl.int64)  # [BLOCK_M]
    head = i % NUM_HEADS
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    r_mask = r < LATENT
    p_mask = p < ROPE
    q_row = q_ptr + sample[:, None] * stride_qb + head[:, None] * stride_qh
    q_latent = tl.load(q_row + r[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
    q_rope = tl.load(q_row + LATENT + p[None, :], mask=row_mask[:, None] & p_mask[None, :], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    table = block_tables_ptr + first_sample.to(tl.int64) * stride_bt
    for tile in range(token_start, token_end, BLOCK_N):
        m, l, acc = _attend_latent_tile(q_latent, q_rope, m, l, acc, table, tile, token_end, cache_ptr, stride_cb,
                                        stride_ct, r, r_mask, p, p_mask, scale, LATENT, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)

    _finish_rows(m, l, acc, sample * NUM_HEADS + head, row_mask, r, r_mask, num_samples, prefix_len, slot, split_tokens,
                 num_slots, partial_ptr, stats_ptr, out_ptr, LATENT, FUSE_MERGE)


MLA_CASCADE_BLOCK_M = 64  # stacked rows per prefix tile (4 samples of 16 heads); measured fastest on the H200 (see DeepseekV2)


def mla_cascade_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                                 context_lens: torch.Tensor, group_starts, prefix_blocks, scale: float, latent_dim: int,
                                 *, max_context_len: int | None = None, plan=None, split_tokens: int = 1024,
                                 block_m: int = MLA_CASCADE_BLOCK_M, block_n: int | None = None,
                                 prefix_warps: int | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """The shared-prefix path of mla_decode_attention (same arguments and result [B, H, R]): samples of group g
    (rows group_starts[g]:group_starts[g+1]) share their first prefix_blocks[g] blocks, read once per row tile of
    block_m stacked (sample, head) rows; private pages per sample; merged by log-sum-exp. The work lists are
    cascade_attention's (plan_cascade / CascadePlan.from_host with num_heads heads on kv_heads = 1); with `plan`
    the host reads no device value (CUDA-graph capturable) and block_m / split_tokens come from the plan.
    prefix_warps: warps of a prefix tile's program (default 4 up to 16 x 256 accumulator elements, else 8).
    workspace: an optional fp32 buffer of >= workspace_numel(plan, B, H, R) elements for the scratch."""
    batch, num_heads, block_size, rope = _check_mla_inputs("mla_cascade_decode_attention", q, cache, block_tables,
                                                           context_lens, latent_dim)
    if plan is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max())  # a device read: pass max_context_len or a plan to avoid it
        plan = plan_cascade(group_starts, prefix_blocks, block_size, num_heads, 1, max_context_len, q.device,
                            split_tokens, block_m)
    if plan.prefix_tokens.shape[0] != batch:
        raise ValueError(f"group_starts / the plan cover {plan.prefix_tokens.shape[0]} sequences but q holds {batch}")
    if plan.heads_per_kv != num_heads:
        raise ValueError(f"mla_cascade_decode_attention: the plan stacks {plan.heads_per_kv} heads per KV head; MLA's "
                         f"one latent row serves all {num_heads} (plan with num_heads={num_heads}, kv_heads=1)")
    num_slots = plan.num_prefix_slots + plan.num_suffix_splits
    partial_numel, need = batch * num_heads * num_slots * latent_dim, workspace_numel(plan, batch, num_heads, latent_dim)
    if workspace is None:
        workspace = torch.empty(need, device=q.device, dtype=torch.float32)
    elif workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.numel() < need:
        raise ValueError(f"workspace: need a contiguous fp32 buffer of >= {need} elements, got {workspace.dtype} "
                         f"{workspace.numel()}")
    partial = workspace[:partial_numel].view(batch, num_heads, num_slots, latent_dim)
    stats = workspace[partial_numel:need].view(batch, num_heads, num_slots, 2)
    block_r = max(16, triton.next_power_of_2(latent_dim))
    common = dict(NUM_HEADS=num_heads, LATENT=latent_dim, ROPE=rope, BLOCK_SIZE=block_size, BLOCK_R=block_r,
                  BLOCK_P=max(16, triton.next_power_of_2(rope)), BLOCK_N=block_n or MLA_BLOCK_N,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    out = torch.empty(batch, num_heads, latent_dim, device=q.device, dtype=q.dtype)
    args = (q, cache, block_tables, context_lens, plan.prefix_tokens, plan.prefix_items, partial, stats, out,
            q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0), float(scale),
            plan.split_tokens, num_slots)
    if plan.prefix_items.shape[0]:
        _mla_stacked_rows_kernel[(plan.prefix_items.shape[0],)](
            *args, BLOCK_M=plan.block_m, IS_SUFFIX=False, FUSE_MERGE=False,
            num_warps=prefix_warps or (4 if plan.block_m * block_r <= 16 * 256 else 8), **common)
    fuse = plan.num_suffix_splits == 1  # the decoder's case (suffixes under split_tokens): no merge kernel
    _mla_stacked_rows_kernel[(batch, plan.num_suffix_splits)](
        *args, BLOCK_M=max(16, triton.next_power_of_2(num_heads)), IS_SUFFIX=True, FUSE_MERGE=fuse,
        num_warps=4 if block_r <= 256 else 8, **common)
    if not fuse:
        _merge_slots_kernel[(batch * num_heads,)](partial, stats, context_lens, plan.prefix_tokens, out, num_slots,
                                                  plan.split_tokens, NUM_HEADS=num_heads, HEAD_DIM=latent_dim,
                                                  BLOCK_D=block_r)
    return out
