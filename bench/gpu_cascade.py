"""Shared-prefix (cascade) decode attention vs the plain paged decode kernel, one attention layer of Qwen2.5-7B
(28 query heads, 4 KV heads, D 128, bf16, block 16), over prefix lengths x samples per prompt, each sample with a
private suffix of 64-192 tokens, 256 sequences in the batch (256 / n prompts). Prints the table and the crossover
(the fewest samples at which cascade wins, per prefix length) that the scheduler should use.

floor_ms: unique KV bytes (each shared prefix once, each suffix once) / measured bandwidth; pct_floor = floor / ours.
peer_GB/s: the plain kernel's achieved bandwidth on the bytes it must read (every sample reads its whole context).
plan_ms / group_ms: host time of plan_cascade_host / find_shared_prefix_groups for the case (once per decode step).
A "padded plan" row times the launch shape a CUDA graph freezes (no-op items, an over-sized suffix grid) against
the tight plan, and its graph replay.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import torch

PREFIX_LENS = [256, 512, 1024, 2048, 4096, 8192]
SAMPLES = [4, 8, 16, 32, 64]
TOTAL_SEQS = 256
NUM_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 28, 4, 128, 16
SUFFIX_RANGE = (64, 192)
CONFIGS = [(block_m, split_tokens) for block_m in (32, 64, 128) for split_tokens in (512, 1024, 2048)]
CONFIG_CASE = (2048, 32, 8)  # the 7B case: 8 prompts of 2,048 tokens, n = 32
DEVICE, DTYPE = "cuda", torch.bfloat16  # a CPU smoke run (TRITON_INTERPRET=1) sets "cpu", fp32 and tiny shapes


def build_batch(prefix_len: int, num_samples: int, num_groups: int, seed: int = 0):
    """Pages for num_groups prompts of prefix_len tokens, each with num_samples samples that share the prompt's
    blocks and own a private suffix; block ids scattered over the pool as in a long-running decoder."""
    rng = np.random.default_rng(seed)
    prefix_blocks = prefix_len // BLOCK_SIZE
    suffix_lens = rng.integers(SUFFIX_RANGE[0], SUFFIX_RANGE[1] + 1, size=num_groups * num_samples)
    suffix_blocks = -(-suffix_lens // BLOCK_SIZE)
    num_blocks = num_groups * prefix_blocks + int(suffix_blocks.sum())
    pool = rng.permutation(num_blocks).astype(np.int32)
    width = prefix_blocks + int(suffix_blocks.max())
    tables = np.zeros((num_groups * num_samples, width), dtype=np.int32)
    cursor = 0
    for g in range(num_groups):
        shared = pool[cursor:cursor + prefix_blocks]
        cursor += prefix_blocks
        for i in range(num_samples):
            b = g * num_samples + i
            tables[b, :prefix_blocks] = shared
            tables[b, prefix_blocks:prefix_blocks + suffix_blocks[b]] = pool[cursor:cursor + suffix_blocks[b]]
            cursor += suffix_blocks[b]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=gen)
    v_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=gen)
    q = torch.randn(num_groups * num_samples, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    context_lens = torch.from_numpy((prefix_len + suffix_lens).astype(np.int32)).to(DEVICE)
    group_starts = [g * num_samples for g in range(num_groups + 1)]
    return q, k_cache, v_cache, torch.from_numpy(tables).to(DEVICE), context_lens, group_starts, [prefix_blocks] * num_groups


def bench_ms(fn) -> float:
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def device_bandwidth() -> float:
    """Bytes read + written per second by a device copy (as bench/gpu.py's ceilings section)."""
    src = torch.randn(256 * 1024**2, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def one_case(prefix_len, num_samples, num_groups, bandwidth, block_m=64, split_tokens=1024) -> dict:
    from grm_engine.decode.shared_prefix import find_shared_prefix_groups
    from grm_engine.kernels.cascade_attention import CascadePlan, cascade_decode_attention, plan_cascade_host
    from grm_engine.kernels.paged_attention import paged_decode_attention

    q, k_cache, v_cache, tables, lens, starts, prefix = build_batch(prefix_len, num_samples, num_groups)
    scale = HEAD_DIM ** -0.5
    max_len = int(lens.max())
    host_tables, host_lens = tables.cpu().numpy(), lens.cpu().numpy()
    table_lens = -(-host_lens // BLOCK_SIZE)
    find_shared_prefix_groups(host_tables, table_lens, host_lens, BLOCK_SIZE)  # warm-up
    host_start = time.perf_counter()
    _, _, found = find_shared_prefix_groups(host_tables, table_lens, host_lens, BLOCK_SIZE)  # as the runner would
    group_ms = (time.perf_counter() - host_start) * 1e3
    host_start = time.perf_counter()
    host = plan_cascade_host(starts, prefix, BLOCK_SIZE, NUM_HEADS, KV_HEADS, max_len, split_tokens, block_m)
    plan_ms = (time.perf_counter() - host_start) * 1e3  # once per decode step, shared by every layer
    plan = CascadePlan.from_host(host, torch.from_numpy(host.items).to(DEVICE), torch.from_numpy(host.prefix_tokens).to(DEVICE))
    ours = lambda: cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, scale, plan=plan)  # noqa: E731
    plain = lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, max_context_len=max_len)  # noqa: E731
    max_diff = (ours().float() - plain().float()).abs().max().item()
    ours_ms, peer_ms = bench_ms(ours), bench_ms(plain)
    token_bytes = KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize  # K and V
    unique_bytes = (num_groups * prefix_len + int(lens.sum()) - len(lens) * prefix_len) * token_bytes
    plain_bytes = int(lens.sum()) * token_bytes
    floor_ms = unique_bytes / bandwidth * 1e3
    row = {"section": "cascade", "case": f"prefix={prefix_len} n={num_samples} prompts={num_groups}",
           "block_m": block_m, "split_tokens": split_tokens, "ours_ms": ours_ms, "peer_ms": peer_ms,
           "floor_ms": floor_ms, "speedup": peer_ms / ours_ms, "pct_floor": 100 * floor_ms / ours_ms,
           "unique_GB": unique_bytes / 1e9, "plain_GB": plain_bytes / 1e9,
           "peer_GB/s": plain_bytes / (peer_ms * 1e-3) / 1e9, "plan_ms": plan_ms, "group_ms": group_ms,
           "max_diff": max_diff, "items": host.num_items, "groups_found": int((found > 0).sum())}
    return row


def padded_case(prefix_len, num_samples, num_groups, bandwidth) -> dict:
    """The launch a captured decode step freezes: the work list padded with no-op items to twice its power-of-two
    capacity and the suffix grid sized for a context bound of the block-table width rounded up to a power of two.
    ref_ms: the tight plan, ours_ms: the padded one (eager), graph_ms: the padded one replayed from a CUDA graph."""
    from grm_engine.kernels.cascade_attention import (CascadePlan, cascade_decode_attention, item_capacity_for,
                                                      plan_cascade_host)

    q, k_cache, v_cache, tables, lens, starts, prefix = build_batch(prefix_len, num_samples, num_groups)
    scale = HEAD_DIM ** -0.5
    bound = (1 << (tables.shape[1] - 1).bit_length()) * BLOCK_SIZE

    def device_plan(host):
        return CascadePlan.from_host(host, torch.from_numpy(host.items).to(DEVICE),
                                     torch.from_numpy(host.prefix_tokens).to(DEVICE))

    tight_host = plan_cascade_host(starts, prefix, BLOCK_SIZE, NUM_HEADS, KV_HEADS, int(lens.max()))
    padded_host = plan_cascade_host(starts, prefix, BLOCK_SIZE, NUM_HEADS, KV_HEADS, bound,
                                    item_capacity=2 * item_capacity_for(tight_host.num_items))
    tight, padded = device_plan(tight_host), device_plan(padded_host)
    run_tight = lambda: cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, scale, plan=tight)  # noqa: E731
    run_padded = lambda: cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, scale, plan=padded)  # noqa: E731
    bitwise = bool(torch.equal(run_tight(), run_padded()))
    row = {"section": "cascade", "case": f"padded plan prefix={prefix_len} n={num_samples} prompts={num_groups}",
           "ours_ms": bench_ms(run_padded), "ref_ms": bench_ms(run_tight), "bitwise_equal": bitwise,
           "items": f"{tight_host.num_items}->{padded_host.items.shape[0]}",
           "suffix_splits": f"{tight_host.num_suffix_splits}->{padded_host.num_suffix_splits}"}
    row["padded_vs_tight"] = row["ours_ms"] / row["ref_ms"]
    if DEVICE == "cuda":
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run_padded()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run_padded()
            row["graph_ms"] = bench_ms(graph.replay)
        except Exception as error:  # record it, keep the table
            row["graph_error"] = str(error)[:80]
    return row


FULL_PREFIX_SWEEP = [(bm, split, bn, warps, stages) for bm in (64, 128) for split in (512, 1024) for bn in (32, 64, 128)
                for warps in (4, 8) for stages in (1, 2, 3)] + [(256, 1024, bn, warps, 2) for bn in (32, 64) for warps in (8, 16)]
# the wide sweep's (FULL_PREFIX_SWEEP, GRM_BENCH_CASCADE_SWEEP=full) fastest ten, run A of session 5, and the old default
SHORT_PREFIX_SWEEP = [(64, 512, 32, 4, 2), (64, 512, 32, 4, 1), (128, 512, 32, 8, 2), (64, 1024, 128, 4, 1),
                      (128, 512, 64, 4, 2), (64, 512, 128, 4, 1), (128, 1024, 128, 8, 1), (128, 512, 32, 8, 3),
                      (64, 1024, 64, 4, 2), (64, 1024, 64, 4, 3)]
PREFIX_SWEEP = FULL_PREFIX_SWEEP if os.environ.get("GRM_BENCH_CASCADE_SWEEP") == "full" else SHORT_PREFIX_SWEEP
SUFFIX_SWEEP = [(bn, warps, stages) for bn in (16, 32, 64) for warps in (2, 4) for stages in (1, 2, 3)]


def tuning_rows(bandwidth, budget_s: float = 300.0) -> list[dict]:
    """Each kernel of the call timed alone at CONFIG_CASE over launch parameters (prefix: block_m, split, block_n,
    warps, stages; suffix: block_n, warps, stages), then the whole call with the best of each, fused merge vs the
    merge kernel. Stops sweeping after budget_s (compiles dominate)."""
    from grm_engine.kernels.cascade_attention import (CascadePlan, CascadeTuning, cascade_decode_attention,
                                                      cascade_launches, plan_cascade_host, workspace_numel)

    q, k_cache, v_cache, tables, lens, starts, prefix = build_batch(*CONFIG_CASE)
    scale, max_len = HEAD_DIM ** -0.5, int(lens.max())
    batch = q.shape[0]
    out = torch.empty_like(q)
    plans = {}

    def plan_for(block_m, split):
        if (block_m, split) not in plans:
            host = plan_cascade_host(starts, prefix, BLOCK_SIZE, NUM_HEADS, KV_HEADS, max_len, split, block_m)
            plans[block_m, split] = CascadePlan.from_host(host, torch.from_numpy(host.items).to(DEVICE),
                                                          torch.from_numpy(host.prefix_tokens).to(DEVICE))
        return plans[block_m, split]

    def part_ms(plan, tuning, name):
        workspace = torch.empty(workspace_numel(plan, batch, NUM_HEADS, HEAD_DIM), device=DEVICE)
        launches = dict(cascade_launches(q, k_cache, v_cache, tables, lens, scale, plan, out, workspace, tuning))
        return bench_ms(launches[name])

    rows, deadline = [], time.perf_counter() + budget_s
    shared_bytes = CONFIG_CASE[2] * CONFIG_CASE[0] * KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
    best_prefix = (float("inf"), None)
    for block_m, split, block_n, warps, stages in PREFIX_SWEEP:
        if time.perf_counter() > deadline:
            rows.append({"section": "cascade", "case": "tuning prefix: budget spent", "left": "rest of the sweep"})
            break
        tuning = CascadeTuning(prefix_block_n=block_n, prefix_warps=warps, prefix_stages=stages)
        row = {"section": "cascade", "case": f"tuning prefix bm={block_m} split={split} bn={block_n} w={warps} s={stages}"}
        try:
            row["ours_ms"] = part_ms(plan_for(block_m, split), tuning, "prefix")
            row["shared_GB/s"] = shared_bytes / (row["ours_ms"] * 1e-3) / 1e9
            if row["ours_ms"] < best_prefix[0]:
                best_prefix = (row["ours_ms"], (block_m, split, tuning))
        except Exception as error:  # e.g. out of shared memory / registers: record it, keep sweeping
            row["error"] = str(error)[:80]
        rows.append(row)
    block_m, split, best = best_prefix[1] or (64, 1024, CascadeTuning())
    plan = plan_for(block_m, split)
    best_suffix = (float("inf"), best)
    for block_n, warps, stages in SUFFIX_SWEEP:
        if time.perf_counter() > deadline + 60:
            break
        tuning = replace(best, suffix_block_n=block_n, suffix_warps=warps, suffix_stages=stages)
        row = {"section": "cascade", "case": f"tuning suffix (fused) bn={block_n} w={warps} s={stages}"}
        try:
            row["ours_ms"] = part_ms(plan, tuning, "suffix")
            if row["ours_ms"] < best_suffix[0]:
                best_suffix = (row["ours_ms"], tuning)
        except Exception as error:
            row["error"] = str(error)[:80]
        rows.append(row)
    best = best_suffix[1]
    reference = cascade_decode_attention(q, k_cache, v_cache, tables, lens, starts, prefix, scale)  # defaults
    for fuse in (False, True):
        tuning = replace(best, fuse_merge=fuse)
        call = lambda: cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, scale, plan=plan,  # noqa: E731
                                                tuning=tuning)
        rows.append({"section": "cascade", "case": f"tuning best bm={block_m} split={split} fused={fuse}",
                     "ours_ms": bench_ms(call), "tuning": str(tuning),
                     "max_diff_vs_default": (call().float() - reference.float()).abs().max().item()})
    default_call = lambda: cascade_decode_attention(q, k_cache, v_cache, tables, lens, starts, prefix, scale)  # noqa: E731
    rows.append({"section": "cascade", "case": "tuning current defaults (plan built per call)",
                 "ours_ms": bench_ms(default_call)})
    return rows


def crossover(rows: list[dict], prefix_lens, samples) -> list[dict]:
    """Per prefix length, the fewest samples from which cascade wins at every larger sample count too."""
    out = []
    for prefix_len in prefix_lens:
        speedups = {r["n"]: r["speedup"] for r in rows if r["prefix"] == prefix_len}
        winning = [n for n in samples if all(speedups[m] > 1.0 for m in samples if m >= n)]
        out.append({"section": "cascade", "case": f"crossover prefix={prefix_len}",
                    "min_samples": winning[0] if winning else f">{samples[-1]}",
                    "speedups": " ".join(f"n{n}:{speedups[n]:.2f}" for n in samples)})
    return out


def run(args) -> list[dict]:
    quick = getattr(args, "quick", False)
    if os.environ.get("GRM_BENCH_CASCADE_TUNING_ONLY") == "1":  # the launch-parameter sweep alone
        bandwidth = getattr(args, "ceilings", {}).get("bandwidth") or device_bandwidth()
        return [one_case(*CONFIG_CASE, bandwidth)] + tuning_rows(bandwidth, float(os.environ.get("GRM_BENCH_CASCADE_SWEEP_S", "300")))
    prefix_lens = [256, 2048] if quick else PREFIX_LENS
    samples = [4, 32] if quick else SAMPLES
    total = 64 if quick else TOTAL_SEQS
    bandwidth = getattr(args, "ceilings", {}).get("bandwidth") or device_bandwidth()
    rows = []
    for prefix_len in prefix_lens:
        for num_samples in samples:
            row = one_case(prefix_len, num_samples, max(1, total // num_samples), bandwidth)
            row["prefix"], row["n"] = prefix_len, num_samples
            rows.append(row)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    table = [{k: v for k, v in r.items() if k not in ("prefix", "n")} for r in rows]
    for block_m, split_tokens in ([] if quick else CONFIGS):  # tile height and split length at CONFIG_CASE
        try:
            table.append(one_case(*CONFIG_CASE, bandwidth, block_m, split_tokens))
        except Exception as error:  # e.g. a tile that does not fit shared memory: record it, keep the table
            table.append({"section": "cascade", "case": f"config block_m={block_m} split={split_tokens}",
                          "error": str(error)[:80]})
    table.append(padded_case(*CONFIG_CASE, bandwidth))
    if not quick:
        table += tuning_rows(bandwidth, float(os.environ.get("GRM_BENCH_CASCADE_SWEEP_S", "300")))
    return table + crossover(rows, prefix_lens, samples)


if __name__ == "__main__":  # CPU smoke run of the code path: TRITON_INTERPRET=1 python bench/gpu_cascade.py
    import types

    DEVICE, DTYPE, PREFIX_LENS, SAMPLES, TOTAL_SEQS, CONFIGS = "cpu", torch.float32, [32, 64], [2, 4], 4, [(16, 32)]
    PREFIX_SWEEP, SUFFIX_SWEEP = [(16, 32, 16, 4, 1), (32, 32, 16, 4, 2)], [(16, 2, 1)]
    CONFIG_CASE = (32, 2, 2)
    NUM_HEADS, KV_HEADS, HEAD_DIM, SUFFIX_RANGE = 14, 2, 32, (1, 20)
    for r in run(types.SimpleNamespace(quick=False, ceilings={"bandwidth": 1e10})):
        print(r)
