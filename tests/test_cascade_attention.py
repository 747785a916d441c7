"""Shared-prefix (cascade) decode attention: Triton (TRITON_INTERPRET=1 on CPU, tiny shapes) == its reference
== the plain decode attention over each sequence's whole context; bf16 error bounds and batch invariance on GPU."""
import random

import pytest
import torch

from grm_engine.decode.attention import decode_attention_reference
from grm_engine.kernels.cascade_attention import (NO_OP_ITEM, CascadePlan, CascadeTuning, cascade_decode_attention,
                                                  cascade_decode_attention_reference, check_shared_prefix,
                                                  item_capacity_for, plan_cascade, plan_cascade_host, workspace_numel)


def shared_prefix_batch(groups, kv_heads, head_dim, block_size, dtype=torch.float32, device="cpu", seed=0):
    """groups: [(prefix_blocks, [suffix_len of each sample])]. Each group's samples share prefix_blocks pages
    (identical ids at the start of their block tables), then own private pages; ids shuffled over a noisy pool.
    Returns k_cache, v_cache, block_tables [B, max_blocks] int32, context_lens [B] int32, group_starts, prefix_blocks."""
    g = torch.Generator().manual_seed(seed)
    needed = sum(p + sum(-(-s // block_size) for s in suffixes) for p, suffixes in groups)
    num_blocks = needed + 2
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables, lens, starts = [], [], [0]
    for prefix_blocks, suffixes in groups:
        shared = [free.pop() for _ in range(prefix_blocks)]
        for suffix_len in suffixes:
            tables.append(shared + [free.pop() for _ in range(-(-suffix_len // block_size))])
            lens.append(prefix_blocks * block_size + suffix_len)
        starts.append(starts[-1] + len(suffixes))
    width = max(len(t) for t in tables) + 1  # padded with 0 past each sequence's blocks, as the decoder does
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, block_tables, context_lens, starts, [p for p, _ in groups]


def random_groups(rng: random.Random, max_groups=3, max_samples=5, max_prefix_blocks=6, max_suffix=20):
    """Random group shapes, including groups of one sample, no shared prefix and 1-token suffixes."""
    return [(rng.choice([0, rng.randint(1, max_prefix_blocks)]),
             [rng.choice([1, rng.randint(1, max_suffix)]) for _ in range(rng.randint(1, max_samples))])
            for _ in range(rng.randint(1, max_groups))]


CPU_CASES = [  # kv_heads, heads_per_kv, head_dim, block_size, groups or a seed for random groups
    (2, 1, 16, 4, [(3, [1, 5, 4]), (0, [7]), (2, [1]), (5, [2, 9, 1, 16])]),
    (1, 7, 32, 8, [(4, [3, 1, 8, 5, 2, 11])]),  # Qwen2.5-7B's GQA factor: 42 stacked rows, three 16-row tiles
    (2, 2, 16, 16, [(1, [16, 1]), (0, [1, 2]), (3, [33])]),  # a private tail longer than one split
    (1, 4, 24, 4, [(9, [1, 2, 3])]),  # head_dim not a power of two; prefix of three splits
    (2, 2, 16, 4, 11), (1, 7, 16, 8, 12), (2, 4, 32, 4, 13), (3, 1, 16, 16, 14),
]


def _case(kv_heads, heads_per_kv, head_dim, block_size, groups, dtype=torch.float32, device="cpu"):
    if isinstance(groups, int):
        groups = random_groups(random.Random(groups))
    k_cache, v_cache, tables, lens, starts, prefix = shared_prefix_batch(groups, kv_heads, head_dim, block_size, dtype,
                                                                         device, seed=len(groups))
    q = torch.randn(tables.shape[0], kv_heads * heads_per_kv, head_dim, generator=torch.Generator().manual_seed(1))
    return q.to(device, dtype), k_cache, v_cache, tables, lens, starts, prefix


@pytest.mark.parametrize("kv_heads,heads_per_kv,head_dim,block_size,groups", CPU_CASES)
def test_cascade_matches_references(kv_heads, heads_per_kv, head_dim, block_size, groups):
    q, k_cache, v_cache, tables, lens, starts, prefix = _case(kv_heads, heads_per_kv, head_dim, block_size, groups)
    scale = head_dim ** -0.5
    check_shared_prefix(tables, lens, starts, prefix, block_size)
    plain = decode_attention_reference(q, k_cache, v_cache, tables, lens, scale)
    reference = cascade_decode_attention_reference(q, k_cache, v_cache, tables, lens, starts, prefix, scale)
    torch.testing.assert_close(reference, plain, atol=1e-5, rtol=1e-5)
    for split_tokens, block_m in [(16, 16), (48, 32)]:  # one key tile per split; three tiles (online rescaling)
        ours = cascade_decode_attention(q, k_cache, v_cache, tables, lens, starts, prefix, scale,
                                        split_tokens=split_tokens, block_m=block_m, block_n=16)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [CPU_CASES[0], CPU_CASES[1], CPU_CASES[2], CPU_CASES[5]])
def test_fused_merge_is_bitwise_the_merge_kernel(case):
    """The suffix kernel's fused merge (one suffix split) adds the slots in the merge kernel's order: bitwise equal
    outputs (same tiles), with and without shared prefixes, empty and multi-page suffixes."""
    kv_heads, heads_per_kv, head_dim, block_size, groups = case
    q, k_cache, v_cache, tables, lens, starts, prefix = _case(kv_heads, heads_per_kv, head_dim, block_size, groups)
    plan = plan_cascade(starts, prefix, block_size, q.shape[1], kv_heads, int(lens.max()), "cpu", split_tokens=128,
                        block_m=16)
    assert plan.num_suffix_splits == 1
    separate = cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, 0.3, plan=plan,
                                        tuning=CascadeTuning(fuse_merge=False, prefix_block_n=16, suffix_block_n=16))
    fused = cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, 0.3, plan=plan,
                                     tuning=CascadeTuning(prefix_block_n=16, suffix_block_n=16, suffix_stages=2))
    assert torch.equal(fused, separate)
    reference = cascade_decode_attention_reference(q, k_cache, v_cache, tables, lens, starts, prefix, 0.3)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_suffix_grid_counts_from_the_shortest_prefix():
    """The suffix grid covers max_context_len minus the shortest shared prefix in the batch (one split when every
    row shares a long prompt and its suffix fits a split, so the merge fuses), the whole context with a plain row."""
    shared = plan_cascade_host([0, 4, 8], [8, 6], 4, 8, 2, 40, split_tokens=16, block_m=16)  # prefixes 32 and 24
    assert shared.num_suffix_splits == 1 and shared.num_prefix_slots == 2
    with_plain = plan_cascade_host([0, 4, 5], [8, 0], 4, 8, 2, 40, split_tokens=16, block_m=16)
    assert with_plain.num_suffix_splits == 3


def test_peaked_scores_stay_finite():
    """Scores spread over hundreds (a near one-hot softmax): no overflow in the online softmax or the merge."""
    q, k_cache, v_cache, tables, lens, starts, prefix = _case(1, 4, 16, 4, [(12, [5, 1, 30]), (0, [40])])
    reference = decode_attention_reference(q, k_cache, v_cache, tables, lens, 8.0)
    ours = cascade_decode_attention(q, k_cache, v_cache, tables, lens, starts, prefix, 8.0, split_tokens=16, block_m=16,
                                    block_n=16)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_plan_reused_across_layers_and_batch_invariance():
    """One plan serves every layer; a sequence's output is bit-identical whether its group runs alone, next to
    other groups, or after a sibling has finished (the split points depend only on its own lengths)."""
    groups = [(3, [2, 5, 1]), (0, [9]), (2, [4, 4])]
    q, k_cache, v_cache, tables, lens, starts, prefix = _case(2, 3, 16, 4, groups)
    kwargs = dict(split_tokens=16, block_m=16, block_n=16)
    plan = plan_cascade(starts, prefix, 4, q.shape[1], 2, int(lens.max()), "cpu", split_tokens=16, block_m=16)
    full = cascade_decode_attention(q, k_cache, v_cache, tables, lens, starts, prefix, 0.25, **kwargs)
    assert torch.equal(cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, 0.25, plan=plan,
                                               block_n=16), full)
    # Under the CPU interpreter tl.dot is numpy's matmul, whose summation order may depend on the number of stacked
    # query rows (BLAS kernels differ with M); on the GPU a tile is a fixed block_m rows, so equality is exact there.
    same = torch.equal if q.is_cuda else (lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6))
    alone = cascade_decode_attention(q[:3], k_cache, v_cache, tables[:3], lens[:3], [0, 3], [3], 0.25, **kwargs)
    assert same(alone, full[:3])
    keep = [0, 2, 3, 4, 5]  # sample 1 of group 0 has finished
    fewer = cascade_decode_attention(q[keep], k_cache, v_cache, tables[keep], lens[keep], [0, 2, 3, 5], [3, 0, 2], 0.25,
                                     **kwargs)
    assert same(fewer, full[keep])


def test_contract_violations_are_named():
    q, k_cache, v_cache, tables, lens, starts, prefix = _case(1, 2, 16, 4, [(2, [1, 3]), (1, [2])])
    bad = tables.clone()
    bad[1, 1] = bad[2, 0]
    with pytest.raises(ValueError, match="group 0"):
        check_shared_prefix(bad, lens, starts, prefix, 4)
    with pytest.raises(ValueError, match="group 1"):
        check_shared_prefix(tables, lens, starts, [2, 2], 4)  # prefix longer than the context
    with pytest.raises(ValueError, match="group_starts"):
        cascade_decode_attention(q, k_cache, v_cache, tables, lens, [0, 1, 2], prefix, 0.25)  # does not reach B = 3
    with pytest.raises(ValueError, match="prefix_blocks"):
        plan_cascade([0, 3], [-1], 4, 2, 1, 9, "cpu")


def test_host_plan_from_host_equals_device_plan():
    starts, prefix = [0, 3, 4, 6, 11], [3, 0, 2, 9]
    host = plan_cascade_host(starts, prefix, 4, 8, 2, 60, split_tokens=16, block_m=16)
    device = plan_cascade(starts, prefix, 4, 8, 2, 60, "cpu", split_tokens=16, block_m=16)
    built = CascadePlan.from_host(host, torch.from_numpy(host.items), torch.from_numpy(host.prefix_tokens))
    for plan in (device, built):
        assert torch.equal(plan.prefix_items, torch.from_numpy(host.items))
        assert torch.equal(plan.prefix_tokens, torch.from_numpy(host.prefix_tokens))
        assert (plan.num_prefix_slots, plan.num_suffix_splits, plan.split_tokens, plan.block_m, plan.heads_per_kv) == (
            host.num_prefix_slots, host.num_suffix_splits, 16, 16, 4)
    # the work list, restated: per group with a prefix, each 16-row tile of its samples x 4 heads per KV head
    # against each 16-token split of its prefix (3 samples: 12 rows, 1 tile; 5 samples: 20 rows, 2 tiles)
    expected = [(0, 3, 0, 0, 12, 0)] + [(4, 2, 0, 0, 8, 0)] + [(6, 5, row, start, min(36, start + 16), start // 16)
                                                                for row in (0, 16) for start in (0, 16, 32)]
    assert host.items.tolist() == [list(e) for e in expected] and host.num_items == 8
    assert host.prefix_tokens.tolist() == [12] * 3 + [0] + [8] * 2 + [36] * 5
    assert host.num_prefix_slots == 3 and host.num_suffix_splits == 4  # ceil((60 - 0) / 16)
    padded = plan_cascade_host(starts, prefix, 4, 8, 2, 60, split_tokens=16, block_m=16, item_capacity=item_capacity_for(8 + 1))
    assert padded.graph_key == (16, 3, 4) and padded.num_items == 8
    assert (padded.items[:8] == host.items).all() and (padded.items[8:] == NO_OP_ITEM).all()
    with pytest.raises(ValueError, match="item_capacity"):
        plan_cascade_host(starts, prefix, 4, 8, 2, 60, split_tokens=16, block_m=16, item_capacity=7)
    with pytest.raises(ValueError, match="items"):
        CascadePlan.from_host(host, torch.zeros(7, 6, dtype=torch.int32), torch.from_numpy(host.prefix_tokens))
    assert [item_capacity_for(n) for n in (0, 1, 2, 3, 8, 9, 1000)] == [1, 1, 2, 4, 8, 16, 1024]


SENTINEL = 12345.0


def _slots_written(workspace, batch, num_heads, num_slots, head_dim):
    """[B, H, num_slots] bool: the scratch slots a call overwrote (a partial row or its stats left the sentinel)."""
    partial_numel = batch * num_heads * num_slots * head_dim
    partial = workspace[:partial_numel].view(batch, num_heads, num_slots, head_dim)
    stats = workspace[partial_numel:partial_numel + batch * num_heads * num_slots * 2].view(batch, num_heads, num_slots, 2)
    return (partial != SENTINEL).any(-1) | (stats != SENTINEL).any(-1)


@pytest.mark.parametrize("groups", [
    [(3, [1, 5, 0]), (0, [7]), (2, [1]), (5, [2, 9, 1, 0])],  # suffix 0: the context ends where the prefix does
    [(4, [0, 0, 0])],  # every context is exactly the shared prefix
    [(0, [1]), (0, [13])],  # no prefix anywhere: no items at all
])
def test_padded_plan_is_bitwise_equal_and_writes_only_used_slots(groups):
    """No-op items and suffix splits past a sequence's suffix write nothing: the outputs are bitwise those of
    the tight plan, and the only scratch slots written are those each sequence's merge reads."""
    q, k_cache, v_cache, tables, lens, starts, prefix = _case(2, 3, 16, 4, groups)
    batch, num_heads, head_dim = q.shape
    tight = plan_cascade(starts, prefix, 4, num_heads, 2, int(lens.max()), "cpu", split_tokens=16, block_m=16)
    host = plan_cascade_host(starts, prefix, 4, num_heads, 2, int(lens.max()) + 40, split_tokens=16, block_m=16,
                             item_capacity=item_capacity_for(tight.prefix_items.shape[0] + 3))
    padded = CascadePlan.from_host(host, torch.from_numpy(host.items), torch.from_numpy(host.prefix_tokens))
    assert host.items.shape[0] > host.num_items and padded.num_suffix_splits > tight.num_suffix_splits
    reference = decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.25)
    full = cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, 0.25, plan=tight, block_n=16)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
    workspace = torch.full((workspace_numel(padded, batch, num_heads, head_dim) + 5,), SENTINEL)
    ours = cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, 0.25, plan=padded, block_n=16,
                                    workspace=workspace)
    assert torch.equal(ours, full)
    num_slots = padded.num_prefix_slots + padded.num_suffix_splits
    prefix_tokens = torch.from_numpy(host.prefix_tokens).long()
    used = -(-prefix_tokens // 16) + -(-(lens.long() - prefix_tokens) // 16)  # [B], as the merge kernel counts
    expected = (torch.arange(num_slots)[None, :] < used[:, None])[:, None, :].expand(batch, num_heads, num_slots)
    assert torch.equal(_slots_written(workspace, batch, num_heads, num_slots, head_dim), expected)
    assert (workspace[-5:] == SENTINEL).all()


def test_workspace_reuse_is_clean():
    """A scratch buffer reused across calls (layers) full of NaN or another call's partials changes nothing."""
    q, k_cache, v_cache, tables, lens, starts, prefix = _case(1, 4, 16, 4, [(6, [3, 1, 9]), (0, [20]), (3, [2, 2])])
    plan = plan_cascade(starts, prefix, 4, 4, 1, int(lens.max()), "cpu", split_tokens=16, block_m=16)
    fresh = cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, 0.3, plan=plan, block_n=16)
    workspace = torch.full((workspace_numel(plan, *q.shape),), float("nan"))
    for layer_q in (q, q.flip(0) * 2.0, q):  # the second "layer" leaves other partials behind
        out = cascade_decode_attention(layer_q, k_cache, v_cache, tables, lens, None, None, 0.3, plan=plan, block_n=16,
                                       workspace=workspace)
    assert torch.equal(out, fresh)
    with pytest.raises(ValueError, match="workspace"):
        cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, 0.3, plan=plan, workspace=workspace[:-1])


# ----------------------------------------------------------------------------------------------- GPU lane
def _bf16_math_attention(q, k_cache, v_cache, tables, lens, scale):
    """The plain PyTorch attention with every op in bf16 (the low-precision reference, as flash-attention's tests)."""
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    max_len = tables.shape[1] * k_cache.shape[1]
    keys = k_cache[tables.long()].reshape(batch, max_len, kv_heads, head_dim)
    values = v_cache[tables.long()].reshape(batch, max_len, kv_heads, head_dim)
    scores = torch.einsum("bhgd,bthd->bhgt", q.view(batch, kv_heads, -1, head_dim), keys) * scale
    visible = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None, :], float("-inf")), dim=-1)
    return torch.einsum("bhgt,bthd->bhgd", probs, values).reshape(batch, num_heads, head_dim)


def _gpu_case(seed, prefix_len=2048, samples=32, num_groups=2):
    rng = random.Random(seed)
    groups = [(prefix_len // 16, [rng.randint(1, 300) for _ in range(samples)]) for _ in range(num_groups)]
    groups.append((0, [rng.randint(1, 1000)]))  # a request without siblings rides along on the plain path
    return _case(4, 7, 128, 16, groups, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("seed,prefix_len,samples", [(0, 2048, 32), (1, 4096, 8), (2, 256, 64)])
def test_cascade_bf16_error_gpu(seed, prefix_len, samples):
    """Qwen2.5-7B attention (28 heads / 4 KV heads, D 128, block 16): error vs the fp32 reference at most 2x the
    error of the plain PyTorch attention in bf16; and close to the plain paged Triton kernel."""
    q, k_cache, v_cache, tables, lens, starts, prefix = _gpu_case(seed, prefix_len, samples)
    scale = 128 ** -0.5
    check_shared_prefix(tables, lens, starts, prefix, 16)
    exact = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    reference_error = (_bf16_math_attention(q, k_cache, v_cache, tables, lens, scale).float() - exact).abs().max().item()
    ours = cascade_decode_attention(q, k_cache, v_cache, tables, lens, starts, prefix, scale)
    our_error = (ours.float() - exact).abs().max().item()
    assert our_error <= 2 * reference_error, (our_error, reference_error)
    from grm_engine.kernels.paged_attention import paged_decode_attention

    plain = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert (plain.float() - ours.float()).abs().max().item() <= 2 * reference_error


@pytest.mark.gpu
def test_cascade_batch_invariance_gpu():
    q, k_cache, v_cache, tables, lens, starts, prefix = _gpu_case(3, 2048, 32)
    full = cascade_decode_attention(q, k_cache, v_cache, tables, lens, starts, prefix, 0.1)
    first = starts[1]
    alone = cascade_decode_attention(q[:first], k_cache, v_cache, tables[:first], lens[:first], [0, first], prefix[:1], 0.1)
    assert torch.equal(alone, full[:first])
    fewer = cascade_decode_attention(q[1:first], k_cache, v_cache, tables[1:first], lens[1:first], [0, first - 1],
                                     prefix[:1], 0.1)
    assert torch.equal(fewer, full[1:first])


@pytest.mark.gpu
def test_cascade_replayed_from_cuda_graph_gpu():
    """Captured once with padded work lists and an over-sized suffix grid, replayed after refilling the buffers
    with another step's inputs (new queries, shorter contexts incl. empty suffixes, another grouping of the same
    graph key): bitwise equal to the eager call with that step's tight plan. Capture fails on any host sync."""
    q, k_cache, v_cache, tables, lens, starts, prefix = _gpu_case(4, 1024, 16)
    batch, num_heads, _ = q.shape
    bound = tables.shape[1] * 16  # the block-table width bounds every context, as in the decoder

    def host_plan(group_starts, prefix_blocks):
        return plan_cascade_host(group_starts, prefix_blocks, 16, num_heads, 4, bound, item_capacity=64)

    first = host_plan(starts, prefix)
    buffers = dict(q=q.clone(), lens=lens.clone(), items=torch.from_numpy(first.items).cuda(),
                   prefix_tokens=torch.from_numpy(first.prefix_tokens).cuda())
    plan = CascadePlan.from_host(first, buffers["items"], buffers["prefix_tokens"])

    def step():
        return cascade_decode_attention(buffers["q"], k_cache, v_cache, tables, buffers["lens"], None, None, 0.1, plan=plan)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    generator = torch.Generator(device="cuda").manual_seed(5)
    second_starts = [0, 10, starts[1], starts[2], batch]  # group 0 split in two, the last group kept
    second_prefix = [prefix[0], prefix[0] // 2, prefix[1], 0]
    prefix_len = torch.tensor([prefix[0] * 16] * starts[1] + [prefix[1] * 16] * (starts[2] - starts[1]) + [1], device="cuda")
    shorter = prefix_len + (lens - prefix_len) // 3  # a third of each suffix
    shorter[0] = prefix[0] * 16  # an empty suffix: the context is exactly the shared prefix
    for new_lens in (lens, shorter):
        new_q = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=generator)
        second = host_plan(second_starts, second_prefix)
        assert second.graph_key == first.graph_key
        buffers["q"].copy_(new_q)
        buffers["lens"].copy_(new_lens.to(torch.int32))
        buffers["items"].copy_(torch.from_numpy(second.items))
        buffers["prefix_tokens"].copy_(torch.from_numpy(second.prefix_tokens))
        graph.replay()
        eager = cascade_decode_attention(new_q, k_cache, v_cache, tables, new_lens.to(torch.int32), second_starts,
                                         second_prefix, 0.1)
        assert torch.equal(out, eager)
        exact = decode_attention_reference(new_q.float(), k_cache.float(), v_cache.float(), tables, new_lens.to(torch.int32), 0.1)
        assert (out.float() - exact).abs().max().item() < 2e-2
