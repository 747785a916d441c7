"""Gated MLP activation act(gate) * up in one pass (SiLU for Llama/Qwen/Mistral, tanh-GeLU for Gemma 2).
Traffic: read gate and up once, write once (unfused: three passes and a temporary). PyTorch's roundings are
kept (act rounded to the model dtype, then the product). Reference: LlamaForCausalLM.mlp in
grm_engine.decode.models.llama (ACTIVATIONS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _gated_act_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, width, GELU_TANH: tl.constexpr,
                      BLOCK: tl.constexpr, LIBDEVICE_TANH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if GELU_TANH:  # PyTorch's formula and order: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))
        if LIBDEVICE_TANH:  # CUDA's tanhf, as PyTorch's kernel
            tanh = libdevice.tanh(inner)
        else:  # the interpreter has no libdevice
            tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        act = 0.5 * g * (1.0 + tanh)
    else:
        act = g / (1.0 + tl.exp(-g))
    act = act.to(gate.dtype).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (act * up).to(gate.dtype), mask=mask)


def gated_act_triton(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """gate, up [T, I] (rows contiguous) -> act(gate) * up [T, I]; activation 'silu' or 'gelu_tanh'."""
    assert gate.shape == up.shape and gate.stride(1) == 1 and up.stride(1) == 1, "gated_act_triton: [T, I] rows"
    rows, width = gate.shape
    out = torch.empty(rows, width, device=gate.device, dtype=gate.dtype)
    if rows:
        block = min(4096, triton.next_power_of_2(width))
        _gated_act_kernel[(rows, triton.cdiv(width, block))](gate, up, out, gate.stride(0), up.stride(0), width,
                                                             GELU_TANH=activation == "gelu_tanh", BLOCK=block,
                                                             LIBDEVICE_TANH=gate.device.type == "cuda",
                                                             num_warps=4)
    return out
