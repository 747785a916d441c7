"""Which rows of a decode batch share a prompt's KV pages, for the shared-prefix (cascade) attention kernel.

Why equal leading block ids mean identical K/V: forked samples share their prompt's blocks (BlockManager.fork)
and prefix-cache hits share physical blocks; a block held by two or more rows is never written (the scheduler
copies a shared block before a step writes into it), so rows whose tables start with the same ids see the same
keys and values there. Only full blocks inside every row's context count (a shared partial block is excluded).

The rule (pure numpy, vectorized: it runs every decode step). Rows sorted lexicographically by block table sit
next to the rows they share most with. A row's depth is the longest prefix (in blocks, at least
min_prefix_tokens long) that it shares with at least min_samples - 1 other rows; a group is the set of rows of
the same depth d that share their first d blocks (the rows whose deepest well-shared node of the block-table
trie is the same; a group can end up smaller than min_samples when some rows share deeper, then its prefix is
0). So k samples of each prompt form one group per prompt with the
whole prompt as prefix, even when every prompt starts with the same instruction template (first-block grouping
would put the whole batch in one group whose prefix is only the template). Rows in no group are groups of one
with prefix 0 (the kernel's plain, suffix-only path).

Thresholds, measured on an H200 with one attention layer of the Qwen2.5-7B shape, 256 sequences (bench/RESULTS.md,
"shared-prefix (cascade) decode attention kernel", bench/gpu_cascade.py, the crossover rows): at a 2,048-token prefix
cascade wins at every n from 4 to 64 (1.29x at n = 4, 1.89x at n = 32); at 1,024 it wins at n = 4-8 (1.13x) but
loses at n >= 16 (0.60-0.77x), and it loses at 512 and below. In the decoder (Qwen2.5-0.5B shape, a 1,024-token
prompt, n = 32) it took 16 us per layer against the plain kernel's 8.5 us. Hence min_prefix_tokens = 2048,
min_samples = 4. DeepSeek-V2's latent (MLA) shared-prefix kernel uses the same rule; its crossover is not measured
separately (bench/gpu_deepseek_v2.py compares the two MLA kernels at a 2,048-token prefix, n = 32).
"""
from __future__ import annotations

import numpy as np

MIN_PREFIX_TOKENS = 2048
MIN_SAMPLES = 4


def _lexicographic_order(block_tables: np.ndarray) -> np.ndarray:
    """[B] int64: rows sorted lexicographically by their bytes (any lexicographic order puts every set of rows
    that share a prefix next to each other, which is all the grouping needs; the groups do not depend on it)."""
    rows = np.ascontiguousarray(block_tables, dtype=np.int32)
    return np.argsort(rows.view(np.dtype((np.void, rows.shape[1] * 4))).ravel(), kind="stable")


def _sliding(values: np.ndarray, width: int, reduce) -> np.ndarray:
    """[n] -> [n - width + 1]: reduce (np.minimum / np.maximum) over each window of `width` (small) values."""
    out = values[:len(values) - width + 1].copy()
    for shift in range(1, width):
        reduce(out, values[shift:len(values) - width + 1 + shift], out=out)
    return out


def _row_depths(shared_with_next: np.ndarray, batch: int, min_samples: int) -> np.ndarray:
    """shared_with_next [B - 1] (blocks shared by sorted rows i and i + 1) -> [B]: per sorted row, the most blocks
    it shares with min_samples - 1 others = the max over windows of min_samples rows holding it of the window's min."""
    if batch < min_samples:
        return np.zeros(batch, dtype=np.int64)
    window_min = _sliding(shared_with_next, min_samples - 1, np.minimum)  # [B - m + 1]
    padded = np.zeros(batch + min_samples - 1, np.int64)
    padded[min_samples - 1:batch] = window_min
    return _sliding(padded, min_samples, np.maximum)  # [B]: windows starting at i - m + 1 .. i


def find_shared_prefix_groups(block_tables: np.ndarray, table_lens: np.ndarray, context_lens: np.ndarray,
                              block_size: int, min_prefix_tokens: int = MIN_PREFIX_TOKENS,
                              min_samples: int = MIN_SAMPLES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """block_tables [B, W] int32 (0-padded rows), table_lens [B], context_lens [B] (tokens with K/V this step).
    Returns order [B] int64 (a permutation: row i of the grouped batch is row order[i] of this one; groups in
    order of their first row, rows of a group in batch order), group_starts [G + 1] int64 (group g is rows
    group_starts[g]:group_starts[g + 1] of the grouped batch) and prefix_blocks [G] int64 (0: no shared prefix),
    as cascade_decode_attention / plan_cascade_host take them. See the module docstring for the rule."""
    block_tables = np.asarray(block_tables)
    batch = block_tables.shape[0]
    if block_tables.ndim != 2 or len(table_lens) != batch or len(context_lens) != batch:
        raise ValueError(f"block_tables {block_tables.shape}, table_lens {len(table_lens)}, context_lens "
                         f"{len(context_lens)}: need [B, W], [B], [B]")
    if min_samples < 2:
        raise ValueError(f"min_samples = {min_samples}: a group shares a prefix among at least 2 rows")
    # full blocks inside the context (context_len <= table_len * block_size, so never past the table)
    caps = np.minimum(np.asarray(context_lens, np.int64) // block_size, np.asarray(table_lens, np.int64))  # [B]
    width = int(min(block_tables.shape[1], caps.max(initial=0)))
    if width == 0:  # no full block anywhere (or no rows): every row alone
        return np.arange(batch, dtype=np.int64), np.arange(batch + 1, dtype=np.int64), np.zeros(batch, np.int64)
    rows = np.arange(batch)
    # the id just past a row's cap becomes a unique negative (ids are >= 0): no two rows match there, so only
    # blocks inside both contexts can count as shared, whatever follows
    capped = block_tables[:, :width].astype(np.int32)  # [B, width] (a copy)
    short = caps < width
    capped[rows[short], caps[short]] = -1 - rows[short]
    lex = _lexicographic_order(capped)  # [B]
    tables = capped[lex]  # [B, width]
    differs = tables[1:] != tables[:-1]  # [B - 1, width]
    shared_with_next = differs.argmax(axis=1)  # [B - 1] first differing column; 0 when none differs: fixed below
    shared_with_next[~differs[rows[:-1], shared_with_next]] = width
    shared_with_next[shared_with_next * block_size < min_prefix_tokens] = 0
    depth = _row_depths(shared_with_next, batch, min_samples)  # [B], sorted rows
    # group = the rows whose deepest shared prefix is the same node of the block-table trie: same depth d, and
    # no adjacent pair between them shares fewer than d blocks (rows that went deeper may sit in between)
    node = np.empty(batch, np.int64)  # [B] sorted rows -> group key
    offset = 0
    for d in np.unique(depth[depth > 0]):  # few distinct depths (one per prompt length)
        in_node = depth == d
        node[in_node] = offset + np.cumsum(np.concatenate([[False], shared_with_next < d]))[in_node]
        offset += batch
    node[depth == 0] = offset + np.flatnonzero(depth == 0)  # no shared prefix: a group of one
    key = np.empty(batch, np.int64)
    key[lex] = node  # [B] original rows
    _, first_row, group = np.unique(key, return_index=True, return_inverse=True)  # [G], [B]
    # number groups by their first row in the batch; a stable argsort keeps batch order inside a group
    rank = np.empty(len(first_row), np.int64)
    rank[np.argsort(first_row)] = np.arange(len(first_row))
    ranked = rank[group.reshape(-1)]  # [B]
    order = np.argsort(ranked, kind="stable")
    sizes = np.bincount(ranked)  # [G] in rank order
    group_depth = np.empty(len(first_row), np.int64)
    group_depth[ranked[lex]] = depth  # every row of a group has the group's depth
    prefix_blocks = np.where(sizes >= min_samples, group_depth, 0)
    return order, np.concatenate([[0], np.cumsum(sizes)]), prefix_blocks


def use_cascade(prefix_blocks: np.ndarray) -> bool:
    """True when some group shares a prefix (else the plain paged kernel serves the whole step)."""
    return bool(np.any(np.asarray(prefix_blocks) > 0))
