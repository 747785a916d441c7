"""The decoder's linear projections at decode-step sizes: the plain reference (the specification) and the
dispatcher for the split-K Triton kernel in grm_engine.kernels.skinny_linear (decode steps with <= 128 rows,
where cuBLAS leaves most SMs idle; DecoderConfig.skinny_linear turns it on)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from grm_engine._backends import use_triton

SKINNY_MAX_ROWS = 128  # grm_engine.kernels.skinny_linear.MAX_ROWS (not imported: importing triton is not free)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) in fp32, rounded once to x's dtype -> [M, N]."""
    out = F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
    return out.to(x.dtype)


def check_skinny_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """TypeError / ValueError naming the tensor and what to do, before any launch."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"skinny_linear: x must be [M, K] and weight [N, K], got x {list(x.shape)} and weight "
                         f"{list(weight.shape)}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"skinny_linear: x and weight must share one dtype of float32, bfloat16, float16; got x "
                        f"{x.dtype}, weight {weight.dtype}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny_linear: x has {x.shape[1]} features but weight [N, K] has K = {weight.shape[1]}")
    if x.shape[0] > SKINNY_MAX_ROWS:
        raise ValueError(f"skinny_linear: x has {x.shape[0]} rows; the kernel serves at most {SKINNY_MAX_ROWS} "
                         "(decode steps); use F.linear for more")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"skinny_linear: x ({x.device}), weight ({weight.device}) and bias must be on one device")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"skinny_linear: bias must be [N] = [{weight.shape[0]}], got {list(bias.shape)}")
        if bias.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"skinny_linear: bias must be {x.dtype} or float32, got {bias.dtype}")


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, config=None
                  ) -> torch.Tensor:
    """x [M, K] (M <= 128; a row-strided view is read in place) @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's
    dtype, fp32 accumulation. config: a grm_engine.kernels.skinny_linear.SkinnyConfig (None: its default_config).
    Callers with more rows use F.linear (the decoder does, for prefill)."""
    check_skinny_inputs(x, weight, bias)
    if not use_triton(x):
        return linear_reference(x, weight, bias)
    from grm_engine.kernels.skinny_linear import skinny_linear_triton

    if x.stride(1) != 1:  # the kernel walks K contiguously; a column-strided x is copied once (rare)
        x = x.contiguous()
    if weight.stride(1) != 1:
        raise ValueError(f"skinny_linear: weight must have unit column stride ([N, K] rows, as nn.Linear stores "
                         f"it), got strides {weight.stride()}; a transposed weight would be copied on every call")
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    return skinny_linear_triton(x, weight, bias, config)
