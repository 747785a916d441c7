"""Mixture of experts as DeepSeek-V2 defines it: softmax router (fp32), top-k per token (greedy, or group-limited:
only the topk_group groups with the best expert may be chosen), weights normalized (norm_topk_prob) or scaled by
routed_scaling_factor; routed experts are SiLU-gated MLPs stored as transformers stores them ([E, 2I, H] gate/up,
[E, H, I] down); shared experts are one dense gated MLP added to every token.

routed_experts_reference (a loop over experts with transformers' own order of operations) is the specification;
grm_engine.kernels.moe.fused_moe is the fast path on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import attention_backend

TOPK_METHODS = ("greedy", "group_limited_greedy")


class Router:
    """The config's routing rule: top_k, topk_method (+ n_group / topk_group), norm_topk_prob, routed_scaling_factor."""

    def __init__(self, config):
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.method = getattr(config, "topk_method", None) or "greedy"
        self.num_groups = getattr(config, "n_group", None)
        self.topk_group = getattr(config, "topk_group", None)
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        self.scaling = float(getattr(config, "routed_scaling_factor", None) or 1.0)
        if self.method not in TOPK_METHODS:
            raise NotImplementedError(f"{config.model_type}: topk_method {self.method!r} is not supported ({', '.join(TOPK_METHODS)} are)")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"config: num_experts_per_tok={self.top_k!r} must be an integer in [1, n_routed_experts={self.num_experts}]")
        if self.method == "group_limited_greedy":
            groups, chosen = self.num_groups, self.topk_group
            if not isinstance(groups, int) or groups < 1 or self.num_experts % groups:
                raise ValueError(f"config: n_group={groups!r} must divide n_routed_experts={self.num_experts} (group_limited_greedy)")
            if not isinstance(chosen, int) or not 1 <= chosen <= groups or chosen * (self.num_experts // groups) < self.top_k:
                raise ValueError(f"config: topk_group={chosen!r} must be in [1, n_group={groups}] and leave at least "
                                 f"num_experts_per_tok={self.top_k} experts to choose from")

    def __call__(self, x: torch.Tensor, gate_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H], gate_weight [E, H] -> (expert ids [T, K] int64, routing weights [T, K] fp32)."""
        scores = F.linear(x.float(), gate_weight.float()).softmax(dim=-1, dtype=torch.float32)  # [T, E]
        if self.method == "group_limited_greedy":
            grouped = scores.view(-1, self.num_groups, self.num_experts // self.num_groups)  # [T, G, E/G]
            best_groups = torch.topk(grouped.max(dim=-1).values, k=self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, best_groups, True)
            scores = scores.masked_fill(~keep[:, :, None].expand_as(grouped).reshape(scores.shape), 0.0)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:  # DeepSeek-V2's rule (transformers' port ignores norm_topk_prob)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.scaling
        return ids, weights


def routed_experts_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                             down: torch.Tensor, act) -> torch.Tensor:
    """x [T, H]; ids, weights [T, K]; gate_up [E, 2I, H]; down [E, H, I] -> [T, H] in x's dtype.
    Experts in increasing order, each over its tokens: down(act(gate) * up) * weight, added into the output
    (transformers' DeepseekV2Experts numerics)."""
    out = torch.zeros_like(x)
    for expert in torch.unique(ids).tolist():
        token_index, slot = torch.where(ids == expert)
        order = torch.argsort(slot * x.shape[0] + token_index)  # transformers' order: by slot, then token
        token_index, slot = token_index[order], slot[order]
        gate, up = F.linear(x[token_index], gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, down[expert]) * weights[token_index, slot, None]
        out.index_add_(0, token_index, y.to(out.dtype))
    return out


def routed_experts(x, ids, weights, gate_up, down, act, act_name: str | None) -> torch.Tensor:
    """The dispatcher: the fused Triton kernel on CUDA (SiLU experts), else the reference."""
    if act_name == "silu" and attention_backend(x.device) == "triton":
        from grm_engine.kernels.moe import fused_moe

        return fused_moe(x, ids, weights, gate_up, down)
    return routed_experts_reference(x, ids, weights, gate_up, down, act)
