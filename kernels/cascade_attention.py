"""Shared-prefix (cascade) decode attention: the samples of one prompt attend to the prompt's shared full pages
as one stacked tensor-core attention (n_samples * heads_per_kv query rows per KV head), each sample to its own
private pages, and the parts are merged exactly by log-sum-exp. Traffic: a shared page is read once per row
tile of a group (one tile holds block_m rows) instead of once per sample; private pages once per sample; plus
fp32 partials of n_splits * D per query head. Reference: `cascade_decode_attention_reference` below (plain
PyTorch, fp32), itself equal to grm_engine.decode.attention.decode_attention_reference over the whole context.

Scope: full attention without soft-capping (Llama/Qwen/Mistral, not Gemma 2's sliding-window or soft-capped
layers: the dispatcher keeps grm_engine.kernels.paged_attention for those). Split points along keys depend only
on a sequence's own prefix and context lengths (multiples of split_tokens from the prefix start and from the
suffix start), and a query row's math never mixes with other rows, so a sequence's result does not depend on
which other sequences share its batch, its group, or its row tile.

CUDA graphs: plan_cascade_host (cascade_plan.py) builds the work lists in numpy (the decoder packs them into its one upload) and
CascadePlan.from_host wraps the device copies; with a plan, the launcher reads no device value. A graph freezes
the grids, so the work list may be padded with NO_OP_ITEMs (item_capacity) and the suffix grid may be an upper
bound (max_context_len): programs without rows or keys store nothing, and the merge reads only the slots a
sequence's own lengths say it filled, so padded plans give bitwise the same output as tight ones.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import triton
import triton.language as tl

from grm_engine.decode.attention import gather_pages
from grm_engine.kernels.paged_attention import _attend_key_tile

from grm_engine.kernels.cascade_plan import (ITEM_FIELDS, NO_OP_ITEM, CascadePlan, HostCascadePlan, item_capacity_for,
                                             plan_cascade, plan_cascade_host, workspace_numel)

__all__ = [  # the work-list planning lives in cascade_plan.py and is re-exported here
    "ITEM_FIELDS", "NO_OP_ITEM", "CascadePlan", "HostCascadePlan", "item_capacity_for", "plan_cascade",
    "plan_cascade_host", "workspace_numel", "attend_with_lse", "merge_by_lse", "cascade_decode_attention_reference",
    "check_groups", "check_shared_prefix", "CascadeTuning", "DEFAULT_TUNING", "cascade_launches",
    "cascade_decode_attention"]


# ----------------------------------------------------------------------------------------------- reference
def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q [R, kv_heads, heads_per_kv, D]; k, v [T, kv_heads, D], every key visible to every query.
    Returns out [R, kv_heads, heads_per_kv, D] and lse [R, kv_heads, heads_per_kv] in fp32 (T = 0: out 0, lse -inf)."""
    scores = torch.einsum("rhgd,thd->rhgt", q.float(), k.float()) * scale
    if k.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float32, device=q.device), scores.new_full(scores.shape[:-1], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("rhgt,thd->rhgd", torch.exp(scores - lse[..., None]), v.float())
    return out, lse


def merge_by_lse(out_a, lse_a, out_b, lse_b):
    """Exact merge of two attentions over disjoint key sets: weights exp(lse_part - lse_total)."""
    lse = torch.logaddexp(lse_a, lse_b)
    return torch.exp(lse_a - lse)[..., None] * out_a + torch.exp(lse_b - lse)[..., None] * out_b, lse


def cascade_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, group_starts, prefix_blocks,
                                       scale) -> torch.Tensor:
    """q [B, H, D] (the query of sequence b sits at position context_lens[b] - 1); caches [num_blocks, block_size,
    kv_heads, D]; block_tables [B, max_blocks]; samples of group g are rows group_starts[g]:group_starts[g+1] and
    share their first prefix_blocks[g] blocks. Returns [B, H, D] in q's dtype (fp32 math)."""
    group_starts, prefix_blocks = check_groups(group_starts, prefix_blocks, q.shape[0])
    batch, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    lens = context_lens.tolist()
    out = torch.empty(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for g, num_prefix_blocks in enumerate(prefix_blocks):
        first, last = group_starts[g], group_starts[g + 1]
        prefix_len = num_prefix_blocks * block_size
        stacked = q[first:last].float().view(last - first, kv_heads, num_heads // kv_heads, head_dim)
        shared_k = gather_pages(k_cache, block_tables[first], prefix_len)  # [prefix_len, kv_heads, D]
        shared_v = gather_pages(v_cache, block_tables[first], prefix_len)
        out_prefix, lse_prefix = attend_with_lse(stacked, shared_k, shared_v, scale)  # the group's rows at once
        for i, b in enumerate(range(first, last)):
            own_k = gather_pages(k_cache, block_tables[b], lens[b])[prefix_len:]  # [suffix_len, kv_heads, D]
            own_v = gather_pages(v_cache, block_tables[b], lens[b])[prefix_len:]
            out_suffix, lse_suffix = attend_with_lse(stacked[i:i + 1], own_k, own_v, scale)
            merged, _ = merge_by_lse(out_prefix[i:i + 1], lse_prefix[i:i + 1], out_suffix, lse_suffix)
            out[b] = merged.view(num_heads, head_dim)
    return out.to(q.dtype)


def check_groups(group_starts, prefix_blocks, batch: int) -> tuple[list[int], list[int]]:
    """Host-side lists; raises ValueError naming the bad argument."""
    starts = [int(x) for x in (group_starts.tolist() if torch.is_tensor(group_starts) else group_starts)]
    blocks = [int(x) for x in (prefix_blocks.tolist() if torch.is_tensor(prefix_blocks) else prefix_blocks)]
    if len(starts) != len(blocks) + 1:
        raise ValueError(f"group_starts has {len(starts)} entries, prefix_blocks {len(blocks)}: need G + 1 and G")
    if starts[0] != 0 or starts[-1] != batch or any(a > b for a, b in zip(starts, starts[1:])):
        raise ValueError(f"group_starts {starts} must rise from 0 to the batch size {batch}")
    if any(n < 0 for n in blocks):
        raise ValueError(f"prefix_blocks {blocks} must be >= 0")
    return starts, blocks


def check_shared_prefix(block_tables, context_lens, group_starts, prefix_blocks, block_size: int) -> None:
    """The contract the kernel relies on (device reads; for tests and debug runs): within a group the first
    prefix_blocks block ids are identical, and the prefix lies inside every sample's context."""
    starts, blocks = check_groups(group_starts, prefix_blocks, block_tables.shape[0])
    for g, n in enumerate(blocks):
        rows = block_tables[starts[g]:starts[g + 1]]
        if n == 0 or rows.shape[0] == 0:
            continue
        if n > block_tables.shape[1] or not bool((rows[:, :n] == rows[:1, :n]).all()):
            raise ValueError(f"group {g}: block_tables rows {starts[g]}:{starts[g + 1]} differ in their first {n} blocks")
        if int(context_lens[starts[g]:starts[g + 1]].min()) < n * block_size:
            raise ValueError(f"group {g}: a context is shorter than the shared prefix of {n * block_size} tokens")


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _work_item(items_ptr, prefix_tokens_ptr, context_lens_ptr, program, split, split_tokens, IS_SUFFIX: tl.constexpr):
    """What one program of a stacked-rows kernel attends to -> (first_sample, num_samples, first_row, token_start,
    token_end, slot, prefix_len). Suffix grid: sample `program`'s private keys, split `split` (num_samples 0 past
    its suffix); prefix grid: work item `program` of the plan (a row tile of a group, a split of its prefix)."""
    if IS_SUFFIX:
        first_sample = program
        first_row = 0
        prefix_len = tl.load(prefix_tokens_ptr + first_sample)
        token_start = prefix_len + split * split_tokens
        token_end = tl.minimum(tl.load(context_lens_ptr + first_sample), token_start + split_tokens)
        num_samples = (token_start < token_end).to(tl.int32)  # 0 past the suffix (or for an empty suffix)
        slot = (prefix_len + split_tokens - 1) // split_tokens + split
    else:
        item = items_ptr + program * 6
        prefix_len = 0  # (read by the fused merge only, which the suffix grid runs)
        first_sample = tl.load(item)
        num_samples = tl.load(item + 1)
        first_row = tl.load(item + 2)
        token_start = tl.load(item + 3)
        token_end = tl.load(item + 4)
        slot = tl.load(item + 5)
    return first_sample, num_samples, first_row, token_start, token_end, slot, prefix_len


@triton.jit
def _finish_rows(m, l, acc, rows, row_mask, cols, col_mask, num_samples, prefix_len, slot, split_tokens, num_slots,
                 partial_ptr, stats_ptr, out_ptr, WIDTH: tl.constexpr, FUSE_MERGE: tl.constexpr):
    """A stacked-rows program's result for output rows `rows` [BLOCK_M] (b * H + h) and columns `cols`: unfused,
    the unnormalized partial + (max, sum) into its slot of the scratch (partial [B, H, num_slots, WIDTH], stats
    [B, H, num_slots, 2]); fused (the suffix grid with one split, after the prefix kernel), the prefix slots merged
    with its own registers in the merge kernel's order (prefix slots, then the suffix: bitwise _merge_slots_kernel's
    result), written as the output [B, H, WIDTH]."""
    out_mask = row_mask[:, None] & col_mask[None, :]
    if FUSE_MERGE:
        first = rows * num_slots  # [BLOCK_M]: slots 0 .. prefix_slots - 1 hold the prefix
        prefix_slots = (prefix_len + split_tokens - 1) // split_tokens
        m_all = tl.where(num_samples > 0, m, float("-inf"))
        for s in range(0, prefix_slots):
            m_all = tl.maximum(m_all, tl.load(stats_ptr + (first + s) * 2, mask=row_mask, other=0.0))
        merged = tl.zeros_like(acc)
        denominator = tl.zeros_like(l)
        for s in range(0, prefix_slots):
            weight = tl.exp(tl.load(stats_ptr + (first + s) * 2, mask=row_mask, other=0.0) - m_all)
            denominator += weight * tl.load(stats_ptr + (first + s) * 2 + 1, mask=row_mask, other=0.0)
            merged += weight[:, None] * tl.load(partial_ptr + (first + s)[:, None] * WIDTH + cols[None, :],
                                                mask=out_mask, other=0.0)
        if num_samples > 0:
            weight = tl.exp(m - m_all)
            denominator += weight * l
            merged += weight[:, None] * acc
        denominator = tl.where(row_mask, denominator, 1.0)  # rows past the sample's heads: 0 / 0, never stored
        tl.store(out_ptr + rows[:, None] * WIDTH + cols[None, :], (merged / denominator[:, None]).to(
            out_ptr.dtype.element_ty), mask=out_mask)
    else:
        out_row = rows * num_slots + slot  # [BLOCK_M]
        tl.store(partial_ptr + out_row[:, None] * WIDTH + cols[None, :], acc, mask=out_mask)
        tl.store(stats_ptr + out_row * 2, m, mask=row_mask)
        tl.store(stats_ptr + out_row * 2 + 1, l, mask=row_mask)


@triton.jit
def _stacked_rows_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, prefix_tokens_ptr, items_ptr,
    partial_ptr, stats_ptr,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    scale, split_tokens, num_slots,
    HEADS_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IS_SUFFIX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FUSE_MERGE: tl.constexpr = False, out_ptr=None,
):
    """One program: BLOCK_M stacked query rows (sample-major, then the query heads of kv_head) against keys
    [token_start, token_end) of the first sample's block table; writes unnormalized partials + (max, sum).
    FUSE_MERGE (suffix grid of one split, launched after the prefix kernel): merges the prefix slots with its own
    registers in the merge kernel's order and writes the output instead of a partial."""
    kv_head = tl.program_id(1)
    # suffix grid (B, kv_heads, num_suffix_splits); prefix grid (num_items, kv_heads)
    first_sample, num_samples, first_row, token_start, token_end, slot, prefix_len = _work_item(
        items_ptr, prefix_tokens_ptr, context_lens_ptr, tl.program_id(0), tl.program_id(2), split_tokens, IS_SUFFIX)

    r = first_row + tl.arange(0, BLOCK_M)
    # A program with no rows (a no-op item padding a graph's work list; a suffix split past the sequence's
    # suffix, the grid being an upper bound) loads nothing, loops over its (empty) key range and stores nothing.
    # Fused, every row of the sample writes its output (from the prefix slots alone when its suffix is empty).
    row_mask = r < (HEADS_PER_KV if FUSE_MERGE else num_samples * HEADS_PER_KV)
    sample = (first_sample + r // HEADS_PER_KV).to(tl.int64)  # [BLOCK_M]
    head = kv_head * HEADS_PER_KV + r % HEADS_PER_KV
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + sample[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    table = block_tables_ptr + first_sample.to(tl.int64) * stride_bt
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile in range(token_start, token_end, BLOCK_N):
        m, l, acc = _attend_key_tile(q, m, l, acc, table, tile, token_end, k_cache_ptr, v_cache_ptr, kv_head, d, d_mask,
                                     stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale, 1.0,
                                     BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)

    _finish_rows(m, l, acc, sample * NUM_HEADS + head, row_mask, d, d_mask, num_samples, prefix_len, slot, split_tokens,
                 num_slots, partial_ptr, stats_ptr, out_ptr, HEAD_DIM, FUSE_MERGE)


@triton.jit
def _merge_slots_kernel(partial_ptr, stats_ptr, context_lens_ptr, prefix_tokens_ptr, out_ptr, num_slots, split_tokens,
                        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merges the slots a sequence filled, in slot order (a fixed order that depends only on its own lengths,
    so the sum rounds the same whatever else is in the batch); every such slot holds at least one key."""
    row = tl.program_id(0)  # b * NUM_HEADS + head
    context_len = tl.load(context_lens_ptr + row // NUM_HEADS)
    prefix_len = tl.load(prefix_tokens_ptr + row // NUM_HEADS)
    used = (prefix_len + split_tokens - 1) // split_tokens + (context_len - prefix_len + split_tokens - 1) // split_tokens
    first = row * num_slots
    d = tl.arange(0, BLOCK_D)
    m_all = tl.load(stats_ptr + first * 2)
    for s in range(1, used):
        m_all = tl.maximum(m_all, tl.load(stats_ptr + (first + s) * 2))
    acc = tl.zeros([BLOCK_D], tl.float32)
    denominator = m_all * 0.0
    for s in range(0, used):
        weight = tl.exp(tl.load(stats_ptr + (first + s) * 2) - m_all)
        denominator += weight * tl.load(stats_ptr + (first + s) * 2 + 1)
        acc += weight * tl.load(partial_ptr + (first + s) * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0)
    tl.store(out_ptr + row * HEAD_DIM + d, (acc / denominator).to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# ----------------------------------------------------------------------------------------------- launcher
# ----------------------------------------------------------------------------------------------- launcher
@dataclass(frozen=True)
class CascadeTuning:
    """Launch parameters of the three kernels (None: Triton's default). Defaults: the fastest measured at the
    Qwen2.5-7B case (bench/gpu_cascade.py, the tuning rows). fuse_merge: when the suffix grid has one split, the
    suffix kernel merges and writes the output itself (no merge kernel, no suffix partial in the scratch)."""

    prefix_block_n: int = 32
    prefix_warps: int | None = 4  # None: 4 for block_m * block_d <= 64 * 128, else 8
    prefix_stages: int | None = 2
    suffix_block_n: int = 64
    suffix_warps: int = 4
    suffix_stages: int | None = 1
    fuse_merge: bool = True


def cascade_launches(q, k_cache, v_cache, block_tables, context_lens, scale, plan: CascadePlan, out: torch.Tensor,
                     workspace: torch.Tensor, tuning: CascadeTuning) -> list[tuple[str, Callable[[], None]]]:
    """The kernel launches of one call, in order, as (name, launch) pairs (the benchmark times them one by one)."""
    batch, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    num_slots = plan.num_prefix_slots + plan.num_suffix_splits
    partial_numel, need = batch * num_heads * num_slots * head_dim, workspace_numel(plan, batch, num_heads, head_dim)
    partial = workspace[:partial_numel].view(batch, num_heads, num_slots, head_dim)
    stats = workspace[partial_numel:need].view(batch, num_heads, num_slots, 2)
    block_d = max(16, triton.next_power_of_2(head_dim))
    common = dict(HEADS_PER_KV=plan.heads_per_kv, HEAD_DIM=head_dim, NUM_HEADS=num_heads, BLOCK_SIZE=block_size,
                  BLOCK_D=block_d, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    args = (q, k_cache, v_cache, block_tables, context_lens, plan.prefix_tokens, plan.prefix_items, partial, stats,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            float(scale), plan.split_tokens, num_slots)
    fuse = tuning.fuse_merge and plan.num_suffix_splits == 1
    prefix_warps = tuning.prefix_warps or (4 if plan.block_m * block_d <= 64 * 128 else 8)
    stages = lambda n: {} if n is None else {"num_stages": n}  # noqa: E731
    launches = []
    if plan.prefix_items.shape[0]:
        launches.append(("prefix", lambda: _stacked_rows_attention_kernel[(plan.prefix_items.shape[0], kv_heads)](
            *args, BLOCK_M=plan.block_m, BLOCK_N=tuning.prefix_block_n, IS_SUFFIX=False, num_warps=prefix_warps,
            **stages(tuning.prefix_stages), **common)))
    launches.append(("suffix", lambda: _stacked_rows_attention_kernel[(batch, kv_heads, plan.num_suffix_splits)](
        *args, BLOCK_M=max(16, triton.next_power_of_2(plan.heads_per_kv)), BLOCK_N=tuning.suffix_block_n,
        IS_SUFFIX=True, FUSE_MERGE=fuse, out_ptr=out, num_warps=tuning.suffix_warps,
        **stages(tuning.suffix_stages), **common)))
    if not fuse:
        launches.append(("merge", lambda: _merge_slots_kernel[(batch * num_heads,)](
            partial, stats, context_lens, plan.prefix_tokens, out, num_slots, plan.split_tokens, NUM_HEADS=num_heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d)))
    return launches


DEFAULT_TUNING = CascadeTuning()


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                             context_lens: torch.Tensor, group_starts, prefix_blocks, scale: float, *,
                             max_context_len: int | None = None, plan: CascadePlan | None = None,
                             split_tokens: int = 512, block_m: int = 64, block_n: int | None = None,
                             workspace: torch.Tensor | None = None, tuning: CascadeTuning = DEFAULT_TUNING) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, kv_heads, D]; block_tables [B, max_blocks] int32; context_lens
    [B] int32; group_starts [G + 1] and prefix_blocks [G] on the host (samples of group g are rows
    group_starts[g]:group_starts[g+1] and share their first prefix_blocks[g] blocks; a group of one or with no
    shared block is the plain path). Pass `plan` (plan_cascade or CascadePlan.from_host) to reuse the work lists
    across layers: then the host reads no device value (CUDA-graph capturable). workspace: an optional fp32 buffer
    of >= workspace_numel(...) elements reused for the scratch (every slot the merge reads is written by this call,
    so stale contents never leak). block_n: keys per tile of both kernels (overrides tuning's). Returns [B, H, D]
    in q's dtype. Full attention only: no window, no soft-capping."""
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32, "block_tables/context_lens: int32"
    if plan is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max())  # a device read: pass max_context_len or a plan to avoid it
        plan = plan_cascade(group_starts, prefix_blocks, block_size, num_heads, kv_heads, max_context_len, q.device,
                            split_tokens, block_m)
    if plan.prefix_tokens.shape[0] != batch:
        raise ValueError(f"group_starts / the plan cover {plan.prefix_tokens.shape[0]} sequences but q holds {batch}")
    need = workspace_numel(plan, batch, num_heads, head_dim)
    if workspace is None:
        workspace = torch.empty(need, device=q.device, dtype=torch.float32)
    elif workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.numel() < need:
        raise ValueError(f"workspace: need a contiguous fp32 buffer of >= {need} elements, got {workspace.dtype} "
                         f"{workspace.numel()}")
    if block_n is not None:
        tuning = replace(tuning, prefix_block_n=block_n, suffix_block_n=block_n)
    out = torch.empty(batch, num_heads, head_dim, device=q.device, dtype=q.dtype)
    for _, launch in cascade_launches(q, k_cache, v_cache, block_tables, context_lens, scale, plan, out, workspace,
                                      tuning):
        launch()
    return out
