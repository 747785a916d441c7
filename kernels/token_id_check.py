"""The completion-id range check on the GPU, without a host sync before the loss kernels: one program per
sequence counts its completion tokens and raises a flag when an unmasked id is outside [0, V); the flag goes to
pinned memory right behind the kernel and is read once the big kernels are queued (FlagReader). Traffic: the
ids and the mask, read once. Reference: grm_engine.loss.check_token_ids (which also names the bad position).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from grm_engine.loss import check_token_ids


@triton.jit
def _check_sequences_kernel(ids_ptr, stride_ib, stride_it, mask_ptr, stride_mb, stride_mt, counts_ptr, flag_ptr,
                            T, V, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per sequence b: counts[b] = its completion tokens (mask != 0); *flag = 1 (zeroed by the caller) when one
    of them has an id outside [0, V). Programs that find one all store the same 1, so no atomic is needed."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    count = tl.zeros([BLOCK_T], tl.int32)
    bad = tl.zeros([BLOCK_T], tl.int32)
    for start in range(0, T, BLOCK_T):
        t = start + offs
        valid = t < T
        token = tl.load(ids_ptr + b * stride_ib + t * stride_it, mask=valid, other=0)
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=valid, other=0) != 0)
        count += valid.to(tl.int32)
        bad += (valid & ((token < 0) | (token >= V))).to(tl.int32)
    tl.store(counts_ptr + b, tl.sum(count, axis=0))
    if tl.sum(bad, axis=0) > 0:
        tl.store(flag_ptr, 1)


def check_sequences(completion_ids, mask, vocab):
    """Queue the per-sequence prologue: (counts [B] int32 completion tokens, flag [1] int32: an id outside [0, V))."""
    batch, length = completion_ids.shape
    buffer = torch.zeros(batch + 1, device=completion_ids.device, dtype=torch.int32)  # counts, then the flag
    counts, flag = buffer[:batch], buffer[batch:]
    if batch and length:
        _check_sequences_kernel[(batch,)](
            completion_ids, *completion_ids.stride(), mask if mask is not None else counts,
            *(mask.stride() if mask is not None else (0, 0)), counts, flag, length, vocab,
            HAS_MASK=mask is not None, BLOCK_T=min(1024, triton.next_power_of_2(length)), num_warps=4)
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
