"""Work lists of the shared-prefix (cascade) decode attention (grm_engine.kernels.cascade_attention), built on the
host once per decode step and shared by every layer: which (row tile, prefix split) programs the prefix kernel runs,
each sequence's shared-prefix length, and the slot counts that size the scratch. Plain numpy/torch; the kernels and
their launcher live in cascade_attention.py, which re-exports these names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

ITEM_FIELDS = 6  # a prefix work item: first_sample, num_samples, first_row, token_start, token_end, slot
NO_OP_ITEM = (0, 0, 0, 0, 0, 0)  # no rows and an empty key range: the program stores nothing (pads a graph's list)


def item_capacity_for(num_items: int) -> int:
    """Work-list rows to allocate for num_items: the next power of two, so CUDA-graph keys repeat across steps."""
    return 1 << max(0, int(num_items) - 1).bit_length()


@dataclass
class HostCascadePlan:
    """A step's work lists on the host (numpy), for the caller to pack into its one host-to-device copy; the ints
    are what a CUDA graph freezes (`graph_key`). Turn it into a CascadePlan with CascadePlan.from_host."""

    items: np.ndarray  # [item_capacity, ITEM_FIELDS] int32; rows past num_items are NO_OP_ITEM
    prefix_tokens: np.ndarray  # [B] int32: shared prefix tokens of each sequence's group (0: plain)
    num_items: int  # work items used (the rest pad to the capacity)
    num_prefix_slots: int  # max prefix splits over groups
    num_suffix_splits: int  # suffix splits launched per sequence: an upper bound; past a suffix, a split stores nothing
    split_tokens: int
    block_m: int
    heads_per_kv: int

    @property
    def graph_key(self) -> tuple[int, int, int]:
        """(item capacity, prefix slots, suffix splits): the launch shape a captured graph freezes."""
        return self.items.shape[0], self.num_prefix_slots, self.num_suffix_splits


def _group_arrays(group_starts, prefix_blocks) -> tuple[np.ndarray, np.ndarray]:
    """group_starts [G + 1], prefix_blocks [G] as int64 numpy (host values only), checked like check_groups."""
    starts = np.asarray(group_starts.tolist() if torch.is_tensor(group_starts) else group_starts, dtype=np.int64)
    blocks = np.asarray(prefix_blocks.tolist() if torch.is_tensor(prefix_blocks) else prefix_blocks, dtype=np.int64)
    if starts.ndim != 1 or blocks.ndim != 1 or len(starts) != len(blocks) + 1:
        raise ValueError(f"group_starts has {len(starts)} entries, prefix_blocks {len(blocks)}: need G + 1 and G")
    if starts[0] != 0 or (np.diff(starts) < 0).any():
        raise ValueError(f"group_starts {starts.tolist()} must rise from 0 to the batch size")
    if (blocks < 0).any():
        raise ValueError(f"prefix_blocks {blocks.tolist()} must be >= 0")
    return starts, blocks


def plan_cascade_host(group_starts, prefix_blocks, block_size: int, num_heads: int, kv_heads: int,
                      max_context_len: int, split_tokens: int = 512, block_m: int = 64,
                      item_capacity: int | Callable[[int], int] | None = None) -> HostCascadePlan:
    """Host lists in, numpy work lists out (vectorized; runs once per decode step). One item per (row tile of
    block_m stacked query rows, split of split_tokens prefix keys) of each group with a shared prefix.
    max_context_len bounds every context (it sizes the suffix grid); item_capacity pads the list with no-ops (a
    number, or a function of the items needed, e.g. item_capacity_for)."""
    if num_heads % kv_heads:
        raise ValueError(f"plan_cascade: {num_heads} query heads for {kv_heads} KV heads")
    if split_tokens % 16 or split_tokens <= 0 or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"plan_cascade: split_tokens {split_tokens} must be a multiple of 16, block_m {block_m} a power of 2 >= 16")
    starts, blocks = _group_arrays(group_starts, prefix_blocks)
    heads_per_kv = num_heads // kv_heads
    num_samples = np.diff(starts)  # [G]
    prefix_len = blocks * block_size  # [G]
    prefix_tokens = np.repeat(prefix_len, num_samples).astype(np.int32)  # [B]
    shared = (prefix_len > 0) & (num_samples > 0)
    tiles = np.where(shared, -(-num_samples * heads_per_kv // block_m), 0)  # row tiles per group
    splits = -(-prefix_len // split_tokens)  # prefix splits per group
    counts = tiles * splits  # items per group, tile-major then split
    num_items = int(counts.sum())
    group = np.repeat(np.arange(len(blocks)), counts)  # [num_items]
    local = np.arange(num_items) - np.repeat(np.cumsum(counts) - counts, counts)
    split = local % np.maximum(splits[group], 1)
    token_start = split * split_tokens
    if callable(item_capacity):
        item_capacity = item_capacity(num_items)
    capacity = num_items if item_capacity is None else int(item_capacity)
    if capacity < num_items:
        raise ValueError(f"item_capacity {capacity} is below the {num_items} work items this step needs")
    items = np.zeros((capacity, ITEM_FIELDS), dtype=np.int32)  # zero rows are NO_OP_ITEM
    items[:num_items] = np.stack([starts[group], num_samples[group], local // np.maximum(splits[group], 1) * block_m,
                                  token_start, np.minimum(prefix_len[group], token_start + split_tokens), split], axis=1)
    num_prefix_slots = -(-int(prefix_tokens.max(initial=0)) // split_tokens)
    min_prefix = int(prefix_tokens.min()) if len(prefix_tokens) else 0  # (min(initial=0) would always give 0)
    max_suffix = max(1, int(max_context_len) - min_prefix)
    return HostCascadePlan(items, prefix_tokens, num_items, num_prefix_slots, -(-max_suffix // split_tokens),
                           split_tokens, block_m, heads_per_kv)


@dataclass
class CascadePlan:
    """Work lists for one decode step on the device (shared by every layer of the step)."""

    prefix_items: torch.Tensor  # [item_capacity, ITEM_FIELDS] int32 on the device (no-op rows allowed)
    prefix_tokens: torch.Tensor  # [B] int32: shared prefix tokens of each sequence's group (padded rows: 0)
    num_prefix_slots: int  # max prefix splits over groups
    num_suffix_splits: int  # suffix splits launched per sequence (an upper bound; splits past a suffix store nothing)
    split_tokens: int
    block_m: int
    heads_per_kv: int

    @classmethod
    def from_host(cls, host: HostCascadePlan, items: torch.Tensor, prefix_tokens: torch.Tensor) -> "CascadePlan":
        """The device plan from device copies of host.items (or a buffer of at least num_items rows, the rest
        no-ops) and host.prefix_tokens (or a longer one whose extra rows are padding with 0). Reads no device value."""
        if items.dtype != torch.int32 or items.dim() != 2 or items.shape[1] != ITEM_FIELDS or items.shape[0] < host.num_items:
            raise ValueError(f"items: need int32 [>= {host.num_items}, {ITEM_FIELDS}], got {items.dtype} {list(items.shape)}")
        if prefix_tokens.dtype != torch.int32 or prefix_tokens.dim() != 1 or prefix_tokens.shape[0] < len(host.prefix_tokens):
            raise ValueError(f"prefix_tokens: need int32 [>= {len(host.prefix_tokens)}], got {prefix_tokens.dtype} "
                             f"{list(prefix_tokens.shape)}")
        return cls(items, prefix_tokens, host.num_prefix_slots, host.num_suffix_splits, host.split_tokens, host.block_m,
                   host.heads_per_kv)


def plan_cascade(group_starts: Sequence[int] | torch.Tensor, prefix_blocks: Sequence[int] | torch.Tensor,
                 block_size: int, num_heads: int, kv_heads: int, max_context_len: int, device,
                 split_tokens: int = 512, block_m: int = 64, item_capacity: int | None = None) -> CascadePlan:
    """plan_cascade_host, then its arrays copied to `device` (two small copies; the decoder packs them itself)."""
    host = plan_cascade_host(group_starts, prefix_blocks, block_size, num_heads, kv_heads, max_context_len, split_tokens,
                             block_m, item_capacity)
    return CascadePlan.from_host(host, torch.from_numpy(host.items).to(device),
                                 torch.from_numpy(host.prefix_tokens).to(device))


def workspace_numel(plan: CascadePlan | HostCascadePlan, batch: int, num_heads: int, head_dim: int) -> int:
    """fp32 elements of the scratch (partials [B, H, slots, D] and stats [B, H, slots, 2]) one call needs."""
    return batch * num_heads * (plan.num_prefix_slots + plan.num_suffix_splits) * (head_dim + 2)
