"""Fused routed experts (kernels/moe.py) vs the loop-over-experts reference, under the Triton interpreter on small
fp32 shapes (GPU lane: bf16 at the DeepSeek-V2-Lite shape); the expert sort/padding it runs on; the MoE layer
(router + routed + shared experts) vs transformers' DeepseekV2Moe."""
import pytest
import torch
import torch.nn.functional as F

from grm_engine.decode.models.moe import routed_experts_reference
from grm_engine.kernels.moe import align_by_expert, fused_moe


def routing(num_tokens, num_experts, top_k, unused=(), seed=0):
    """Random top-k routing in which the experts in `unused` get no token (and, with few experts, others get many)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=g)
    scores[:, list(unused)] = float("-inf")
    weights, ids = torch.topk(scores.softmax(-1), top_k, dim=-1, sorted=False)
    return ids, weights


@pytest.mark.parametrize("num_tokens,block_m", [(1, None), (29, 16), (70, 64)])
def test_fused_moe_matches_reference(num_tokens, block_m):
    torch.manual_seed(num_tokens)
    hidden, inter, num_experts, top_k = 48, 40, 8, 3  # not multiples of the tiles: masks on every axis
    x = torch.randn(num_tokens, hidden)
    gate_up, down = 0.2 * torch.randn(num_experts, 2 * inter, hidden), 0.2 * torch.randn(num_experts, hidden, inter)
    ids, weights = routing(num_tokens, num_experts, top_k, unused=(5,), seed=num_tokens)
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    assert counts[5] == 0 and (num_tokens == 1 or counts.max() > 1)
    expected = routed_experts_reference(x, ids, weights, gate_up, down, F.silu)
    out = fused_moe(x, ids, weights, gate_up, down, block_m=block_m)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_align_by_expert_groups_and_pads_every_pair_once():
    ids, _ = routing(37, 6, 2, unused=(0, 4))
    sorted_pairs, block_experts = align_by_expert(ids, 6, 16)
    flat = ids.flatten()
    real = sorted_pairs[sorted_pairs < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # every pair exactly once
    for block, expert in enumerate(block_experts.tolist()):
        rows = sorted_pairs[block * 16:(block + 1) * 16]
        rows = rows[rows < flat.numel()].long()
        if expert == 6:  # past the last expert's run: padding only
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((flat[rows] == expert).all())
    assert set(block_experts.tolist()) - {6} == set(flat.tolist())  # unused experts get no block


def test_moe_layer_matches_transformers():
    """Router (greedy and group-limited), routed experts and shared experts together equal transformers' module."""
    import transformers as tf
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf

    from grm_engine.decode.models.moe import Router

    for method in ("greedy", "group_limited_greedy"):
        config = tf.DeepseekV2Config(hidden_size=32, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3,
                                     n_shared_experts=2, routed_scaling_factor=2.5, topk_method=method, n_group=4,
                                     topk_group=2, num_attention_heads=4, initializer_range=0.3)
        torch.manual_seed(1)
        layer = hf.DeepseekV2Moe(config).eval()
        with torch.no_grad():
            for param in layer.parameters():
                param.normal_(0, 0.3)
        x = torch.randn(1, 40, 32)
        with torch.no_grad():
            expected = layer(x)[0]
        weights = {k: v.detach() for k, v in layer.state_dict().items()}
        ids, routing_weights = Router(config)(x[0], weights["gate.weight"])
        out = routed_experts_reference(x[0], ids, routing_weights, weights["experts.gate_up_proj"],
                                       weights["experts.down_proj"], F.silu)
        shared = F.linear(F.silu(F.linear(x[0], weights["shared_experts.gate_proj.weight"]))
                          * F.linear(x[0], weights["shared_experts.up_proj.weight"]), weights["shared_experts.down_proj.weight"])
        torch.testing.assert_close(out + shared, expected, atol=1e-6, rtol=1e-5)
        fused = fused_moe(x[0], ids, routing_weights, weights["experts.gate_up_proj"], weights["experts.down_proj"])
        torch.testing.assert_close(fused + shared, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [256, 2048])
def test_fused_moe_bf16_at_deepseek_v2_lite_shape(num_tokens):
    """Error against the fp32 reference at most 2x the bf16 reference's (DESIGN: tolerances)."""
    torch.manual_seed(0)
    hidden, inter, num_experts, top_k = 2048, 1408, 64, 6
    x = torch.randn(num_tokens, hidden, device="cuda")
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device="cuda") * hidden ** -0.5
    down = torch.randn(num_experts, hidden, inter, device="cuda") * inter ** -0.5
    scores = torch.randn(num_tokens, num_experts, device="cuda")
    weights, ids = torch.topk(scores.softmax(-1), top_k, dim=-1, sorted=False)
    exact = routed_experts_reference(x, ids, weights, gate_up, down, F.silu)
    bf16 = [t.bfloat16() for t in (x, gate_up, down)]
    reference_error = (routed_experts_reference(bf16[0], ids, weights, bf16[1], bf16[2], F.silu).float() - exact).abs().max()
    out = fused_moe(bf16[0], ids, weights, bf16[1], bf16[2])
    assert out.dtype == torch.bfloat16
    assert (out.float() - exact).abs().max() <= 2 * reference_error
