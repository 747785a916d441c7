"""The completion-id range check on the GPU, without a host sync before the loss kernels: one program per
sequence counts its completion tokens and raises a flag when an unmasked id is outside [0, V) or a given
old/ref log-prob, advantage or reward that would reach the loss is NaN/Inf; the flag goes to pinned memory right
behind the kernel and is read once the big kernels are queued (FlagReader). Traffic: the ids, the mask and those
inputs, read once. References: grm_engine.loss.check_token_ids and nonfinite_flag (check_finite_inputs names the
bad position).

One int32 buffer [2 + B] holds the results: [0] the flag, [1] the completion tokens of the batch, [2 + b] those of
sequence b. grpo_loss queues this check right behind its loss kernel (kernels/grpo_loss.py), so that nothing but
the Python checks and one allocation stands before the big kernel's launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from grm_engine.loss import NONFINITE_FLAG, check_token_ids, nonfinite_flag

COUNTS_OFFSET = 2  # the buffer's layout: flag, batch total, then one count per sequence
COUNTS_AT = tl.constexpr(COUNTS_OFFSET)  # the same, for kernels (a jit function reads constexpr globals only)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 without its per-call cost (a constexpr_function in newer Triton: ~10 us a call)."""
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def _not_finite(x):
    x = x.to(tl.float32)
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _check_sequences_kernel(ids_ptr, stride_ib, stride_it, mask_ptr, stride_mb, stride_mt, ints_ptr, old_ptr,
                            stride_ob, stride_ot, ref_ptr, stride_rb, stride_rt, adv_ptr, stride_a, rewards_ptr,
                            stride_w, T, V, NONFINITE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_OLD: tl.constexpr,
                            HAS_REF: tl.constexpr, HAS_ADV: tl.constexpr, HAS_REWARDS: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    """Per sequence b, into ints [2 + B] (zeroed by the caller): ints[2 + b] = its completion tokens (mask != 0),
    ints[1] += the same, ints[0] |= 1 when one of them has an id outside [0, V), |= NONFINITE when an old/ref
    log-prob at one of them, its advantage (if it has completion tokens) or its reward is NaN/Inf
    (grm_engine.loss._nonfinite_masks, the same rule)."""
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
    tl.store(ints_ptr + COUNTS_AT + b, num_tokens)
    tl.atomic_add(ints_ptr + 1, num_tokens)
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
        tl.atomic_or(ints_ptr, flags)


def new_flag_buffer(batch, device):
    """The zeroed int32 [2 + B] buffer that _check_sequences_kernel fills (flag, batch total, counts)."""
    return torch.zeros(COUNTS_OFFSET + batch, device=device, dtype=torch.int32)


def queue_check(ints, completion_ids, mask, vocab, *, old_logp=None, ref_logp=None, advantages=None, rewards=None):
    """Launch _check_sequences_kernel into ints (new_flag_buffer). Per-token [B, T] advantages (rare) are checked
    by tensor ops after the kernel; everything else by the kernel."""
    per_token_advantages = None
    if advantages is not None and advantages.dim() == 2:
        per_token_advantages, advantages = advantages, None
    batch, length = completion_ids.shape
    if batch and length:
        _check_sequences_kernel[(batch,)](
            completion_ids, *completion_ids.stride(),
            ints if mask is None else mask, *((0, 0) if mask is None else mask.stride()), ints,
            ints if old_logp is None else old_logp, *((0, 0) if old_logp is None else old_logp.stride()),
            ints if ref_logp is None else ref_logp, *((0, 0) if ref_logp is None else ref_logp.stride()),
            ints if advantages is None else advantages, 0 if advantages is None else advantages.stride(0),
            ints if rewards is None else rewards, 0 if rewards is None else rewards.stride(0),
            length, vocab, NONFINITE=NONFINITE_FLAG, HAS_MASK=mask is not None, HAS_OLD=old_logp is not None,
            HAS_REF=ref_logp is not None, HAS_ADV=advantages is not None, HAS_REWARDS=rewards is not None,
            BLOCK_T=min(1024, next_power_of_2(length)), num_warps=4)
    if per_token_advantages is not None:
        valid = torch.ones_like(completion_ids, dtype=torch.bool) if mask is None else mask != 0
        ints[:1] |= nonfinite_flag(valid, advantages=per_token_advantages)


def check_sequences(completion_ids, mask, vocab, *, old_logp=None, ref_logp=None, advantages=None, rewards=None):
    """Queue the per-sequence prologue: (counts [B] int32 completion tokens, flag [1] int32: bit 1 an id outside
    [0, V), bit NONFINITE_FLAG a NaN/Inf in the given old/ref log-probs [B, T], advantages [B] (or [B, T]: checked
    by tensor ops after the kernel) or rewards [B]). Both are views of one new_flag_buffer."""
    ints = new_flag_buffer(completion_ids.shape[0], completion_ids.device)
    queue_check(ints, completion_ids, mask, vocab, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages,
                rewards=rewards)
    return ints[COUNTS_OFFSET:], ints[:1]


class FlagReader:
    """Reads a device flag after more work is queued. The copy to pinned memory is queued now, so waiting for it
    later waits for the work queued before the copy only, never for the kernels queued after it. The pinned slot
    and its event come from a small pool per device (a pinned allocation and a new CUDA event cost host time on
    every call); the slot goes back to the pool once is_set() has read it (a reader dropped unread keeps it)."""

    _free: dict = {}  # device index -> [(pinned int32 [1], CUDA event)]: slots no reader holds

    def __init__(self, flag):
        self.value = None
        if not flag.is_cuda:
            self.value = bool(flag.item())  # on the CPU the kernels have already run
            return
        self.pool = self._free.setdefault(flag.device.index, [])
        try:
            self.host, self.event = self.pool.pop()
        except IndexError:
            self.host, self.event = torch.empty(1, dtype=torch.int32, pin_memory=True), torch.cuda.Event()
        self.host.copy_(flag, non_blocking=True)
        self.event.record(torch.cuda.current_stream(flag.device))  # the copy's stream, whatever device is current

    def is_set(self) -> bool:
        if self.value is None:
            self.event.synchronize()
            self.value = bool(self.host.item())
            self.pool.append((self.host, self.event))
        return self.value


def raise_bad_token_ids(completion_ids, mask, vocab):
    """The flag was set: name the first bad position (grm_engine.loss.check_token_ids raises the error)."""
    valid = torch.ones_like(completion_ids, dtype=torch.bool) if mask is None else mask != 0
    check_token_ids(completion_ids, valid, vocab)
    raise RuntimeError("the GPU range check flagged a completion id outside the vocabulary that the host check "
                       "does not find (were completion_ids changed while the kernels ran?)")
