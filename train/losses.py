"""Training losses on the policy's last hidden states through the fused lm_head kernels (grm_engine.loss):
the full [tokens, V] logits never exist on the GPU path (V = 152k at Qwen sizes).

Cross-entropy reuses fused_linear_grpo_loss: with advantage 1, beta 0, no old log-probs and the bnpo
reduction, its gradient is exactly the gradient of the token-mean negative log-likelihood (ratio 1 with the
gradient of exp(logp - logp.detach())); its value is replaced by the true NLL from the returned log-probs.
"""
from __future__ import annotations

import torch

from ..loss import fused_linear_grpo_loss


def call_through_module(module: torch.nn.Module, fn, hidden: torch.Tensor, *args):
    """fn(module, hidden, *args) run through module.__call__, so DeepSpeed ZeRO-3's hooks gather the module's
    parameters for the call (an lm_head weight read outside its own forward has numel 0 under ZeRO-3).

    The fused kernels take operands of one dtype and pick their own GEMM precision, so autocast is switched
    off around them; under autocast (plain GPU runs keep fp32 weights) hidden is cast to the autocast dtype
    first, as autocast would cast a matmul's inputs, and fn casts the weight to hidden's dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    module.forward = lambda *a: fn(module, *a)
    try:
        with torch.autocast(device_type, enabled=False):
            return module(hidden, *args)
    finally:
        del module.forward  # back to the class's forward


def final_logit_softcap(model) -> float | None:
    """The soft-capping a model's forward applies to its output logits (Gemma 2: final_logit_softcapping), so the
    fused losses see the logits the model does; None for models without it."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def completion_nll_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, target_ids: torch.Tensor,
                       mask: torch.Tensor, softcap: float | None = None):
    """hidden [B, T, H] (position t predicts target_ids[:, t]), mask [B, T] bool ->
    (loss whose gradient is d(sum of NLL over masked tokens), detached NLL sum). Caller divides by the global
    token count. softcap: final_logit_softcap(model)."""
    count = mask.sum()

    def run(head, hidden, target_ids, mask):
        weight = head.weight
        bias = getattr(head, "bias", None)
        ones = torch.ones(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        loss, stats = fused_linear_grpo_loss(hidden, weight.to(hidden.dtype) if weight.dtype != hidden.dtype else weight,
                                             target_ids, mask, bias=bias, advantages=ones, beta=0.0, loss_type="bnpo",
                                             softcap=softcap)
        return loss, stats.logp

    loss, logp = call_through_module(lm_head, run, hidden, target_ids, mask)
    # bnpo loss = -mean(masked ratio * 1) with the gradient of -mean(logp): scale to a sum
    nll_sum = -(logp * mask).sum()
    surrogate = loss * count.clamp(min=1)
    return surrogate + (nll_sum - surrogate).detach(), nll_sum.detach()


def plain_completion_nll_sum(logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: fp32 log_softmax over full logits [B, T, V] (as the model outputs them, soft-capped where it
    caps), summed over masked tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum()
