"""The completion-id range check on the GPU, without a host sync before the loss kernels: one program per
sequence counts its completion tokens and raises a flag when an unmasked id is outside [0, V) or a given
old/ref log-prob, advantage or reward that would reach the loss is NaN/Inf; the flag goes to pinned memory right
behind the kernel and is read once the big kernels are queued (FlagReader). Traffic: the ids, the mask and those
inputs, read once. References: grm_engine.loss.check_token_ids and nonfinite_flag (check_finite_inputs names the
bad position).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from grm_engine.loss import NONFINITE_FLAG, check_token_ids, nonfinite_flag


@triton.jit
def _not_finite(x):
    x = x.to(tl.float32)
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _check_sequences_kernel(ids_ptr, stride_ib, stride_it, mask_ptr, stride_mb, stride_mt, counts_ptr, flag_ptr,
                            old_ptr, stride_ob, stride_ot, ref_ptr, stride_rb, stride_rt, adv_ptr, stride_a,
                            rewards_ptr, stride_w, T, V, NONFINITE: tl.constexpr, HAS_MASK: tl.constexpr,
                            HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_ADV: tl.constexpr,
                            HAS_REWARDS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per sequence b: counts[b] = its completion tokens (mask != 0); *flag |= 1 (zeroed by the caller) when one
    of them has an id outside [0, V), |= NONFINITE when an old/ref log-prob at one of them, its advantage (if it has
    completion tokens) or its reward is NaN/Inf (grm_engine.loss._nonfinite_masks, the same rule)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    count = tl.zeros([BLOCK_T], tl.int32)
    bad = tl.zeros([BLOCK_T], tl.int32)
    nonfinite = tl.zeros([BLOCK_T], tl.int32)
    for start in range(0, T, BLOCK_T):
        t = start + offs
        valid = t < T
        token = tl.load(ids_ptr + b * stride_ib + t * stride_it, mask=valid, other=0)
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=valid, other=0) != 0)
        count += valid.to(tl.int32)
        bad += (valid & ((token < 0) | (token >= V))).to(tl.int32)
        if HAS_OLD:
            old = tl.load(old_ptr + b * stride_ob + t * stride_ot, mask=valid, other=0.0)
            nonfinite += (valid & _not_finite(old)).to(tl.int32)
        if HAS_REF:
            ref = tl.load(ref_ptr + b * stride_rb + t * stride_rt, mask=valid, other=0.0)
            nonfinite += (valid & _not_finite(ref)).to(tl.int32)
    num_tokens = tl.sum(count, axis=0)
    tl.store(counts_ptr + b, num_tokens)
    flags = (tl.sum(bad, axis=0) > 0).to(tl.int32)
    if tl.sum(nonfinite, axis=0) > 0:
        flags = flags | NONFINITE
    if HAS_ADV:
        if _not_finite(tl.load(adv_ptr + b * stride_a)) & (num_tokens > 0):
            flags = flags | NONFINITE
    if HAS_REWARDS:
        if _not_finite(tl.load(rewards_ptr + b * stride_w)):
            flags = flags | NONFINITE
    if flags != 0:
        tl.atomic_or(flag_ptr, flags)


def check_sequences(completion_ids, mask, vocab, *, old_logp=None, ref_logp=None, advantages=None, rewards=None):
    """Queue the per-sequence prologue: (counts [B] int32 completion tokens, flag [1] int32: bit 1 an id outside
    [0, V), bit NONFINITE_FLAG a NaN/Inf in the given old/ref log-probs [B, T], advantages [B] (or [B, T]: checked
    by tensor ops after the kernel) or rewards [B])."""
    per_token_advantages = advantages if advantages is not None and advantages.dim() == 2 else None
    if per_token_advantages is not None:
        advantages = None

    batch, length = completion_ids.shape
    buffer = torch.zeros(batch + 1, device=completion_ids.device, dtype=torch.int32)  # counts, then the flag
    counts, flag = buffer[:batch], buffer[batch:]
    if batch and length:
        def tensor_args(tensor, dims):  # (pointer, strides): a dummy pointer and zero strides when absent
            if tensor is None:
                return (counts,) + (0,) * dims
            return (tensor,) + tuple(tensor.stride())
        _check_sequences_kernel[(batch,)](
            completion_ids, *completion_ids.stride(), mask if mask is not None else counts,
            *(mask.stride() if mask is not None else (0, 0)), counts, flag,
            *tensor_args(old_logp, 2), *tensor_args(ref_logp, 2), *tensor_args(advantages, 1),
            *tensor_args(rewards, 1), length, vocab, NONFINITE=NONFINITE_FLAG, HAS_MASK=mask is not None,
            HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None, HAS_ADV=advantages is not None,
            HAS_REWARDS=rewards is not None, BLOCK_T=min(1024, triton.next_power_of_2(length)), num_warps=4)
    if per_token_advantages is not None:  # rare: the prologue reads [B] advantages only
        valid = torch.ones_like(completion_ids, dtype=torch.bool) if mask is None else mask != 0
        flag |= nonfinite_flag(valid, advantages=per_token_advantages)
    return counts, flag


class FlagReader:
    """Reads a device flag after more work is queued. The copy to pinned memory is queued now, so waiting for it
    later waits for the work queued before the copy only, never for the kernels queued after it."""

    def __init__(self, flag):
        self.event = None
        self.host = flag
        if flag.is_cuda:
            self.host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(flag.device))  # the copy's stream, whatever device is current

    def is_set(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host.item())


def raise_bad_token_ids(completion_ids, mask, vocab):
    """The flag was set: name the first bad position (grm_engine.loss.check_token_ids raises the error)."""
    valid = torch.ones_like(completion_ids, dtype=torch.bool) if mask is None else mask != 0
    check_token_ids(completion_ids, valid, vocab)
    raise RuntimeError("the GPU range check flagged a completion id outside the vocabulary that the host check "
                       "does not find (were completion_ids changed while the kernels ran?)")
