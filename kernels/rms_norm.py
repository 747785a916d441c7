"""RMSNorm for the decoder, one row per program, optionally fused with the residual add before it:
x = x + delta (rounded to the model dtype, as PyTorch's add), then weight * rms_norm(x). Traffic: read x (and
delta) once, write the output (and the new x) once, instead of the 4-6 passes of the unfused ops.
Reference: grm_engine.decode.models.layers (rms_norm: Llama numerics, gemma_rms_norm: (1 + w) in fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, out_ptr, residual_out_ptr, stride_x, stride_delta, stride_out,
                     stride_residual, hidden, eps,
                     HAS_DELTA: tl.constexpr, GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:  # the residual add in the model dtype, then the sum is what the next layer sees
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual + cols, x, mask=mask)
    x = x.to(tl.float32)
    normed = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:  # (1 + w) in fp32, one rounding at the end
        out = normed * (1.0 + weight)
    else:  # Llama: round the normalized row to the model dtype first, then the weight product (rounded again)
        out = normed.to(out_ptr.dtype.element_ty).to(tl.float32) * weight
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None,
                    gemma: bool = False):
    """x [T, hidden] (and delta [T, hidden]) -> out [T, hidden], or (out, x + delta) when delta is given."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous(), "rms_norm_triton: rows must be contiguous"
    rows, hidden = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    residual = torch.empty_like(out) if delta is not None else out
    if rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](x, delta if delta is not None else x, weight, out, residual, x.stride(0),
                                  delta.stride(0) if delta is not None else 0, out.stride(0), residual.stride(0),
                                  hidden, float(eps), HAS_DELTA=delta is not None, GEMMA=gemma, BLOCK=block,
                                  num_warps=4 if block <= 2048 else 8)
    return (out, residual) if delta is not None else out
