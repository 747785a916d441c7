"""Shared-prefix (cascade) decode attention: Triton (TRITON_INTERPRET=1 on CPU, tiny shapes) == its reference
== the plain decode attention over each sequence's whole context; bf16 error bounds and batch invariance on GPU."""
import random

import pytest
import torch

from grm_engine.decode.attention import decode_attention_reference
from grm_engine.kernels.cascade_attention import (cascade_decode_attention, cascade_decode_attention_reference,
                                                  check_shared_prefix, plan_cascade)


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
    assert torch.equal(cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, 0.25, plan=plan), full)
    alone = cascade_decode_attention(q[:3], k_cache, v_cache, tables[:3], lens[:3], [0, 3], [3], 0.25, **kwargs)
    assert torch.equal(alone, full[:3])
    keep = [0, 2, 3, 4, 5]  # sample 1 of group 0 has finished
    fewer = cascade_decode_attention(q[keep], k_cache, v_cache, tables[keep], lens[keep], [0, 2, 3, 5], [3, 0, 2], 0.25,
                                     **kwargs)
    assert torch.equal(fewer, full[keep])


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
