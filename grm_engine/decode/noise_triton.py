"""Sampling noise u [B, V] in one Triton kernel: the hash of (row state, token id) in uint32 registers.
Memory traffic: writes B * V * 4 bytes, reads B * 4 (the torch int32 path makes ~16 passes over [B, V]).
Reference: grm_engine.decode.sampler.uniform_noise_reference (bit-identical; tests/test_decode_host.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sampler import U_MAX


@triton.jit
def _mix32(x):
    """mix32 of the reference on uint32: >> is a logical shift, * wraps mod 2**32 (as & MASK32 in int64)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x5BD1E995, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _uniform_noise_kernel(row_hash_ptr, out_ptr, vocab_size, u_max, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_hash = tl.load(row_hash_ptr + row).to(tl.uint32, bitcast=True)
    token_hash = _mix32(cols.to(tl.uint32) ^ tl.full(cols.shape, 0x082EFA98, tl.uint32))
    bits = _mix32(row_hash ^ token_hash)
    u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # exact: 24-bit integer, power-of-2 scale
    u = tl.minimum(u, u_max)
    tl.store(out_ptr + row.to(tl.int64) * vocab_size + cols, u, mask=cols < vocab_size)


def uniform_noise_triton(row_hash: torch.Tensor, vocab_size: int, block: int = 1024) -> torch.Tensor:
    """row_hash [B] int32 (to_int32_bits(row_keys(keys)) or row_hash_numpy) -> u [B, V] fp32."""
    if row_hash.dim() != 1 or row_hash.dtype != torch.int32:
        raise ValueError(f"uniform_noise_triton: row_hash must be a [B] int32 tensor, got {tuple(row_hash.shape)} {row_hash.dtype}")
    row_hash = row_hash.contiguous()
    out = torch.empty(row_hash.shape[0], vocab_size, dtype=torch.float32, device=row_hash.device)
    if out.numel():
        _uniform_noise_kernel[(row_hash.shape[0], triton.cdiv(vocab_size, block))](row_hash, out, vocab_size, U_MAX, BLOCK=block)
    return out
