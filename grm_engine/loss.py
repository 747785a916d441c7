"""GRPO loss: the plain PyTorch reference (the specification), input checks and the dispatcher.

Semantics follow TRL's GRPOTrainer loss (token-level importance ratio, k3 KL, grpo / bnpo / dr_grpo
reductions), so a user switching from TRL gets the same numbers. Choices TRL leaves open, made here:
  * masked counts are clamped to 1: a fully masked sequence contributes 0 to the loss, never NaN,
    and kl / clip_frac of an all-masked batch are 0;
  * the mask is boolean (any nonzero entry counts as a completion token);
  * masked positions report logp = 0 and never reach the math: their logits, advantages and old/ref log-probs
    may hold anything (Inf, NaN) without changing the loss or the gradient;
  * NaN/Inf in advantages, old_logp or ref_logp at a completion position, in rewards, or in beta is a ValueError
    naming the tensor (the Triton paths flag it on the GPU and read the flag after their kernels are queued);
  * the exponents of both ratios (logp - old_logp, ref_logp - logp) are clamped at LOG_RATIO_MAX
    (torch.clamp semantics: zero gradient beyond it) so extreme but finite inputs never give Inf/NaN;
    exp(60) ~ 1e26, far beyond any ratio a real run produces, so ordinary numbers equal TRL's;
  * kl in GRPOStats is 0 when it is not computed (ref_logp None or beta == 0), as TRL skips it.
The Triton fast paths (grm_engine.kernels.grpo_loss / linear_grpo) must agree with this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._backends import use_triton

LOG_RATIO_MAX = 60.0
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
ADVANTAGE_SCALES = ("group", "batch", "none")


@dataclass
class GRPOStats:
    kl: torch.Tensor  # scalar fp32: masked mean of the per-token k3 KL (0 when not computed)
    clip_frac: torch.Tensor  # scalar fp32: fraction of masked tokens where the clip was active
    logp: torch.Tensor  # [B, T] fp32, detached; 0 at masked positions


# ----------------------------------------------------------------------------- advantages

def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """A = (r - group mean) / (std + eps); std unbiased, of the group ("group") or the batch ("batch").

    rewards: [B] with consecutive groups of `group_size` samples of one prompt. Returns fp32 [B].
    A group whose rewards are all equal gets A = 0 (std 0, divided by eps).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale={scale!r} is not one of {ADVANTAGE_SCALES}")
    batch = rewards.shape[0]
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if batch % group_size != 0:
        raise ValueError(f"rewards has {batch} entries, not divisible by group_size={group_size}")
    if scale == "group" and group_size == 1:
        raise ValueError("group_size=1 with scale='group': the std of a one-sample group is undefined; "
                         "use scale='batch' or scale='none'")
    if scale == "batch" and batch < 2:
        raise ValueError("scale='batch' needs at least 2 rewards for an unbiased std")
    grouped = rewards.float().view(-1, group_size)  # [B/G, G]
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # [B]
    if scale == "none":
        return centered
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)  # [B]
    else:
        std = rewards.float().std()
    return centered / (std + eps)


# ----------------------------------------------------------------------------- checks

def _check_bt(name, tensor, batch, length, device, allow_1d=False):
    if tensor is None:
        return
    shape = tensor.shape  # compared with tuples directly: this runs on every call, before the first kernel
    if shape != (batch, length) and not (allow_1d and shape == (batch,)):
        want = " or ".join(str(list(s)) for s in [(batch, length)] + ([(batch,)] if allow_1d else []))
        raise ValueError(f"{name} must have shape {want}, got {list(shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but logits are on {device}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")


def check_loss_inputs(batch, length, device, completion_ids, mask, *, advantages, rewards, group_size,
                      old_logp, ref_logp, loss_type, temperature, max_completion_length):
    """Validate everything except the logits/hidden tensor; raises with the offending argument's name."""
    if completion_ids.shape != (batch, length):
        raise ValueError(f"completion_ids must have shape [{batch}, {length}], got {list(completion_ids.shape)}")
    if completion_ids.dtype.is_floating_point or completion_ids.dtype == torch.bool:
        raise TypeError(f"completion_ids must be an integer tensor, got {completion_ids.dtype}")
    if mask.shape != (batch, length):
        raise ValueError(f"mask must have shape [{batch}, {length}], got {list(mask.shape)}")
    if completion_ids.device != device:
        raise ValueError(f"completion_ids is on {completion_ids.device} but logits are on {device}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but logits are on {device}")
    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages= ([B] or [B, T]) or rewards= (with group_size=)")
    _check_bt("advantages", advantages, batch, length, device, allow_1d=True)
    if rewards is not None:
        if group_size is None:
            raise ValueError("rewards= needs group_size=")
        _check_bt("rewards", rewards, batch, length, device, allow_1d=True)
        if rewards.dim() != 1:
            raise ValueError(f"rewards must be 1-D [B], got shape {list(rewards.shape)}")
        if not isinstance(group_size, int) or group_size < 2 or batch % group_size:
            raise ValueError(f"group_size={group_size!r} must be an int >= 2 dividing the batch size {batch}")
    _check_bt("old_logp", old_logp, batch, length, device)
    _check_bt("ref_logp", ref_logp, batch, length, device)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")


def check_token_ids(completion_ids, valid, vocab_size):
    """An id outside [0, V) at a completion position is a caller bug: raise, naming the first one (row-major).
    A host sync: the reference paths call it first; the Triton paths check on the GPU and call it on failure."""
    bad = valid & ((completion_ids < 0) | (completion_ids >= vocab_size))
    if bool(bad.any()):
        index = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"completion_ids{list(index)} = {int(completion_ids[index])} is outside the vocabulary [0, {vocab_size})")


def check_scalars(beta, eps_low, eps_high, temperature) -> None:
    """beta, the clip range and the temperature are finite numbers (a NaN beta would make every loss NaN)."""
    for name, value in (("beta", beta), ("eps_low", eps_low), ("eps_high", eps_high), ("temperature", temperature)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")


def _nonfinite_masks(valid, advantages=None, rewards=None, old_logp=None, ref_logp=None):
    """(name, tensor, bad [same shape]) per given tensor: non-finite entries that would reach the loss. Per-token
    tensors count at completion positions only; a [B] advantage when its sequence has one; rewards always (a
    reward feeds its whole group's advantages)."""
    out = []
    for name, tensor in (("advantages", advantages), ("rewards", rewards), ("old_logp", old_logp),
                         ("ref_logp", ref_logp)):
        if tensor is None:
            continue
        bad = ~torch.isfinite(tensor)
        if name != "rewards":
            bad = bad & (valid if tensor.dim() == 2 else valid.any(dim=1))
        out.append((name, tensor, bad))
    return out


def check_finite_inputs(valid, **tensors) -> None:
    """Raise ValueError naming the first non-finite advantage, reward or old/ref log-prob that would reach the
    loss (a host sync: the reference paths call it first; the Triton paths call it when the GPU flag is set)."""
    for name, tensor, bad in _nonfinite_masks(valid, **tensors):
        if bool(bad.any()):
            index = tuple(bad.nonzero()[0].tolist())
            where = "" if name == "rewards" else " (a completion position)"
            raise ValueError(f"{name}{list(index)} = {tensor[index].item()} is not finite{where}; NaN/Inf there "
                             f"would make the loss or its gradient NaN")


def nonfinite_flag(valid, **tensors) -> torch.Tensor:
    """int32 [1] on the device: NONFINITE_FLAG when check_finite_inputs would raise, else 0 (no host sync)."""
    flag = torch.zeros(1, dtype=torch.int32, device=valid.device)
    for _, _, bad in _nonfinite_masks(valid, **tensors):
        flag |= bad.any().to(torch.int32) * NONFINITE_FLAG
    return flag


NONFINITE_FLAG = 2  # ORed into the Triton kernels' flag (1: a bad completion id); any set bit: no gradient written


def token_weights(valid: torch.Tensor, loss_type: str, max_completion_length=None) -> torch.Tensor:
    """Per-token weight w [B, T] fp32 with loss = sum(w * loss_tok); 0 exactly at masked tokens."""
    valid = valid.float()
    batch, length = valid.shape
    if loss_type == "grpo":
        return valid / (valid.sum(dim=1, keepdim=True).clamp(min=1.0) * batch)
    if loss_type == "bnpo":
        return valid / valid.sum().clamp(min=1.0)
    return valid / (batch * (max_completion_length or length))


# ----------------------------------------------------------------------------- reference

def _upcast(tensor):
    """fp32 math for bf16/fp16/fp32 inputs; fp64 stays fp64 (tests use it as the high-precision truth)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def per_token_loss_reference(logp, valid, advantages, old_logp, ref_logp, beta, eps_low, eps_high):
    """logp [B, T] fp32 with grad -> (loss_tok, kl, clipped), each [B, T] fp32; TRL's per-token formulas."""
    # Masked positions never reach the math: a NaN there would give NaN gradients through 0 * NaN.
    zero = torch.zeros_like(logp)
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # [B, 1]: one advantage for every token of a sequence
    advantages = torch.where(valid, advantages.to(logp.dtype), zero)  # [B, T]
    old_logp = None if old_logp is None else torch.where(valid, old_logp.to(logp.dtype), zero)
    ref_logp = None if ref_logp is None else torch.where(valid, ref_logp.to(logp.dtype), zero)
    if old_logp is None:
        # 1, with the gradient of the ratio; a -inf logp (banned target) gets ratio 1 and no gradient
        ratio = torch.exp(torch.where(torch.isfinite(logp), logp - logp.detach(), 0.0))
    else:
        ratio = torch.exp((logp - old_logp.to(logp.dtype)).clamp(max=LOG_RATIO_MAX))
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss_tok = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - eps_low) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta != 0:
        log_ratio = (ref_logp.to(logp.dtype) - logp).clamp(max=LOG_RATIO_MAX)
        kl = torch.exp(log_ratio) - log_ratio - 1
        loss_tok = loss_tok + beta * kl
    # where, not multiply: a masked token may hold Inf (e.g. a banned target) and 0 * Inf is NaN
    return torch.where(valid, loss_tok, zero), torch.where(valid, kl, zero), (clipped & valid).float()


def reduce_stats(loss_tok, kl, clipped, valid, loss_type, max_completion_length):
    weights = token_weights(valid, loss_type, max_completion_length)
    count = valid.float().sum().clamp(min=1.0)
    return (loss_tok * weights).sum(), kl.sum() / count, clipped.sum() / count


def grpo_loss_reference(logits, completion_ids, mask, *, advantages=None, rewards=None, group_size=None,
                        old_logp=None, ref_logp=None, beta=0.08, eps_low=0.2, eps_high=0.2, temperature=1.0,
                        loss_type="grpo", max_completion_length=None):
    """The specification: fp32 log_softmax over the completion positions' logits, then TRL's per-token loss."""
    valid = mask != 0
    if advantages is None:
        advantages = group_advantages(rewards, group_size)
    logp = _completion_logprobs(logits, completion_ids, valid, temperature)[0]  # [B, T]
    loss_tok, kl, clipped = per_token_loss_reference(logp, valid, advantages, old_logp, ref_logp, beta, eps_low, eps_high)
    loss, kl_mean, clip_frac = reduce_stats(loss_tok, kl, clipped, valid, loss_type, max_completion_length)
    return loss, GRPOStats(kl=kl_mean.detach(), clip_frac=clip_frac.detach(), logp=logp.detach())


def _completion_logprobs(logits, completion_ids, valid, temperature, return_entropy=False):
    """-> (logp [B, T], entropy [B, T] or None), 0 where masked. Only the completion rows are selected before
    log_softmax, so a masked position's logits (Inf, NaN) reach neither the values nor the gradient."""
    rows = _upcast(logits[valid])  # [N, V]
    log_probs = torch.log_softmax(rows / temperature, dim=-1)  # [N, V]
    token_logp = log_probs.gather(-1, completion_ids[valid].long()[:, None]).squeeze(-1)  # [N]
    logp = torch.zeros(valid.shape, dtype=token_logp.dtype, device=logits.device).masked_scatter(valid, token_logp)
    if not return_entropy:
        return logp, None
    probs = log_probs.exp()
    token_entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(-1)  # [N]; 0 * -inf would be NaN
    return logp, torch.zeros_like(logp).masked_scatter(valid, token_entropy)


def token_logprobs_reference(logits, completion_ids, *, mask=None, temperature=1.0, return_entropy=False):
    """log_softmax(logits / T)[id] in fp32 [B, T] (0 where masked); optionally the entropy [B, T]."""
    valid = torch.ones(completion_ids.shape, dtype=torch.bool, device=logits.device) if mask is None else mask != 0
    with torch.no_grad():
        logp, entropy = _completion_logprobs(logits, completion_ids, valid, temperature, return_entropy)
        return (logp, entropy) if return_entropy else logp


def softcap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping, cap * tanh(logits / cap), as its lm_head output applies it (None: as is)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def check_softcap(softcap) -> None:
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap = {softcap!r}: a finite number > 0 (the model's final_logit_softcapping) or None")


def fused_linear_grpo_loss_reference(hidden, weight, completion_ids, mask, *, bias=None, softcap=None, **kwargs):
    """Unfused: the full [B, T, V] logits in the hidden dtype (as an lm_head would, soft-capped when the model
    caps them), then the reference loss. Masked hidden rows are zeroed first: a NaN there would reach the weight
    gradient through 0 * NaN."""
    hidden = torch.where((mask != 0)[..., None], hidden, 0.0)
    logits = hidden @ weight.t()  # [B, T, V]
    if bias is not None:
        logits = logits + bias
    return grpo_loss_reference(softcap_logits(logits, softcap), completion_ids, mask, **kwargs)


def fused_linear_token_logprobs_reference(hidden, weight, completion_ids, *, bias=None, softcap=None, **kwargs):
    if kwargs.get("mask") is not None:
        hidden = torch.where((kwargs["mask"] != 0)[..., None], hidden, 0.0)
    logits = hidden @ weight.t()  # [B, T, V]
    logits = softcap_logits(logits if bias is None else logits + bias, softcap)
    return token_logprobs_reference(logits, completion_ids, **kwargs)


# ----------------------------------------------------------------------------- dispatch

def _check_logits(logits):
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {list(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")


def grpo_loss(logits, completion_ids, mask, *, advantages=None, rewards=None, group_size=None, old_logp=None,
              ref_logp=None, beta=0.08, eps_low=0.2, eps_high=0.2, temperature=1.0, loss_type="grpo",
              max_completion_length=None, inplace=True):
    """GRPO loss over logits [B, T, V] (logits[:, t] predicts completion_ids[:, t]) -> (loss, GRPOStats).

    inplace=True (Triton path): the gradient is written into the logits buffer during the forward,
    so after this call the logits hold dlogits; pass inplace=False to keep them.
    A completion id outside [0, V) raises ValueError on every path. The Triton path checks on the GPU and reads
    the result after its kernels are queued (no stall before them); a failed call writes no gradient.
    """
    _check_logits(logits)
    batch, length, vocab = logits.shape
    check_loss_inputs(batch, length, logits.device, completion_ids, mask, advantages=advantages, rewards=rewards,
                      group_size=group_size, old_logp=old_logp, ref_logp=ref_logp, loss_type=loss_type,
                      temperature=temperature, max_completion_length=max_completion_length)
    check_scalars(beta, eps_low, eps_high, temperature)
    options = dict(advantages=advantages, rewards=rewards, group_size=group_size, old_logp=old_logp,
                   ref_logp=ref_logp, beta=beta, eps_low=eps_low, eps_high=eps_high, temperature=temperature,
                   loss_type=loss_type, max_completion_length=max_completion_length)
    if not use_triton(logits):
        check_token_ids(completion_ids, mask != 0, vocab)
        check_finite_inputs(mask != 0, advantages=advantages, rewards=rewards, old_logp=old_logp, ref_logp=ref_logp)
        return grpo_loss_reference(logits, completion_ids, mask, **options)
    return _triton_paths().grpo_loss_triton(logits, completion_ids, mask, inplace=inplace, **options)


def _triton_paths():
    """grm_engine.kernels.grpo_loss, imported on first use (Triton loads only when a Triton path runs); kept in a
    global afterwards, as a `from ... import` statement on every call costs microseconds before the first kernel."""
    global _TRITON_MODULE
    if _TRITON_MODULE is None:
        from .kernels import grpo_loss as module

        _TRITON_MODULE = module
    return _TRITON_MODULE


_TRITON_MODULE = None


def token_logprobs(logits, completion_ids, *, mask=None, temperature=1.0, return_entropy=False):
    """Forward-only log-probs [B, T] fp32 (for old/ref log-probs), same numerics as grpo_loss."""
    _check_logits(logits)
    batch, length, vocab = logits.shape
    if tuple(completion_ids.shape) != (batch, length):
        raise ValueError(f"completion_ids must have shape [{batch}, {length}], got {list(completion_ids.shape)}")
    if mask is not None and tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask must have shape [{batch}, {length}], got {list(mask.shape)}")
    if not use_triton(logits):
        check_token_ids(completion_ids, torch.ones_like(completion_ids, dtype=torch.bool) if mask is None else mask != 0,
                        vocab)
        return token_logprobs_reference(logits, completion_ids, mask=mask, temperature=temperature,
                                        return_entropy=return_entropy)
    return _triton_paths().token_logprobs_triton(logits, completion_ids, mask=mask, temperature=temperature,
                                                 return_entropy=return_entropy)


def fused_linear_grpo_loss(hidden, weight, completion_ids, mask, *, bias=None, chunk_size=None, softcap=None,
                           **options):
    """The GRPO loss with the lm_head fused in: hidden [B, T, H], weight [V, H] -> (loss, GRPOStats).
    softcap: the model's final-logit soft-capping (Gemma 2: config.final_logit_softcapping), applied to the logits
    before the temperature as the model's forward does; None for models without it.

    The Triton path never builds the full [B*T, V] logits (chunks of compacted unmasked tokens).
    """
    check_softcap(softcap)
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [B, T, H] and weight [V, H] do not match: {list(hidden.shape)} vs {list(weight.shape)}")
    if weight.device != hidden.device or weight.dtype != hidden.dtype:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, {hidden.device})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    batch, length, _ = hidden.shape
    options.setdefault("beta", 0.08)
    check_loss_inputs(batch, length, hidden.device, completion_ids, mask,
                      **{k: options.get(k) for k in ("advantages", "rewards", "group_size", "old_logp", "ref_logp",
                                                     "max_completion_length")},
                      loss_type=options.get("loss_type", "grpo"), temperature=options.get("temperature", 1.0))
    check_scalars(options["beta"], options.get("eps_low", 0.2), options.get("eps_high", 0.2),
                  options.get("temperature", 1.0))
    if not use_triton(hidden):
        check_token_ids(completion_ids, mask != 0, weight.shape[0])
        check_finite_inputs(mask != 0, **{k: options.get(k) for k in ("advantages", "rewards", "old_logp", "ref_logp")})
        return fused_linear_grpo_loss_reference(hidden, weight, completion_ids, mask, bias=bias, softcap=softcap,
                                                **options)
    from .kernels.linear_grpo import fused_linear_grpo_loss_triton

    return fused_linear_grpo_loss_triton(hidden, weight, completion_ids, mask, bias=bias, chunk_size=chunk_size,
                                         softcap=softcap, **options)


def fused_linear_token_logprobs(hidden, weight, completion_ids, *, bias=None, mask=None, temperature=1.0,
                                return_entropy=False, chunk_size=None, softcap=None):
    """token_logprobs with the lm_head fused in (hidden [B, T, H], weight [V, H]); chunked on the Triton path.
    softcap: as fused_linear_grpo_loss's."""
    check_softcap(softcap)
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [B, T, H] and weight [V, H] do not match: {list(hidden.shape)} vs {list(weight.shape)}")
    batch, length, _ = hidden.shape
    if tuple(completion_ids.shape) != (batch, length):
        raise ValueError(f"completion_ids must have shape [{batch}, {length}], got {list(completion_ids.shape)}")
    if mask is not None and tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask must have shape [{batch}, {length}], got {list(mask.shape)}")
    options = dict(bias=bias, mask=mask, temperature=temperature, return_entropy=return_entropy, softcap=softcap)
    if not use_triton(hidden):
        check_token_ids(completion_ids, torch.ones_like(completion_ids, dtype=torch.bool) if mask is None else mask != 0,
                        weight.shape[0])
        return fused_linear_token_logprobs_reference(hidden, weight, completion_ids, **options)
    from .kernels.linear_grpo import fused_linear_token_logprobs_triton

    return fused_linear_token_logprobs_triton(hidden, weight, completion_ids, chunk_size=chunk_size, **options)


__all__ = ["GRPOStats", "group_advantages", "grpo_loss", "token_logprobs", "fused_linear_grpo_loss",
           "fused_linear_token_logprobs",
           "grpo_loss_reference", "token_logprobs_reference", "fused_linear_grpo_loss_reference"]
