"""Sampling noise u [B, V] in one Triton kernel: the hash of (row state, token id) in uint32 registers.
Memory traffic: writes B * V * 4 bytes, reads B * 4 (the torch int32 path makes ~16 passes over [B, V]).
And the whole Gumbel-max draw without filters (gumbel_argmax_triton): one read of the logits, no [B, V] output.
Reference: grm_engine.decode.sampler (uniform_noise_reference, bit-identical; sample's unfused path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

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
def _uniform(row_hash_ptr, row, cols, u_max):
    """u of (row, token ids cols): the hash of the row state and the token id, its top 24 bits, capped at u_max."""
    row_hash = tl.load(row_hash_ptr + row).to(tl.uint32, bitcast=True)
    token_hash = _mix32(cols.to(tl.uint32) ^ tl.full(cols.shape, 0x082EFA98, tl.uint32))
    bits = _mix32(row_hash ^ token_hash)
    u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # exact: 24-bit integer, power-of-2 scale
    return tl.minimum(u, u_max)


@triton.jit
def _uniform_noise_kernel(row_hash_ptr, out_ptr, vocab_size, u_max, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u = _uniform(row_hash_ptr, row, cols, u_max)
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


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, stride_logits, temperature_ptr, row_hash_ptr, value_ptr, index_ptr, vocab_size,
                          num_chunks, u_max, BLOCK: tl.constexpr, LIBDEVICE_LOG: tl.constexpr):
    """One (row, chunk of BLOCK tokens): max and first argmax of logits / T - log(-log(u)), u as
    _uniform_noise_kernel draws it; the float ops of the unfused path (division, logf twice, negations, one add)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    u = _uniform(row_hash_ptr, row, cols, u_max)
    if LIBDEVICE_LOG:  # CUDA's logf, as torch.log: the same bits as the unfused path
        gumbel = -libdevice.log(-libdevice.log(u))
    else:  # the interpreter has no libdevice
        gumbel = -tl.log(-tl.log(u))
    logits = tl.load(logits_ptr + row.to(tl.int64) * stride_logits + cols, mask=cols < vocab_size, other=0.0)
    value = tl.where(cols < vocab_size, gumbel + logits.to(tl.float32) / temperature, float("-inf"))
    out = row.to(tl.int64) * num_chunks + chunk
    tl.store(value_ptr + out, tl.max(value, axis=0))
    tl.store(index_ptr + out, tl.argmax(value, axis=0, tie_break_left=True).to(tl.int64) + chunk * BLOCK)


def gumbel_argmax_triton(logits: torch.Tensor, temperature: torch.Tensor, row_hash: torch.Tensor,
                         block: int = 4096) -> torch.Tensor:
    """logits [B, V] (rows contiguous), temperature [B] fp32 (> 0), row_hash [B] int32 -> tokens [B] int64:
    argmax(logits / T + Gumbel(u)) without materializing u or the perturbed logits (one read of the logits).
    Chunks of `block` tokens in parallel, then the first maximal chunk (torch.argmax: first occurrence)."""
    batch, vocab_size = logits.shape
    assert logits.stride(1) == 1, "gumbel_argmax_triton: logits rows must be contiguous"
    num_chunks = triton.cdiv(vocab_size, block)
    values = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    indices = torch.empty(batch, num_chunks, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return indices[:, 0]
    _gumbel_argmax_kernel[(batch, num_chunks)](logits, logits.stride(0), temperature.float().contiguous(),
                                               row_hash.contiguous(), values, indices, vocab_size, num_chunks, U_MAX,
                                               BLOCK=block, LIBDEVICE_LOG=logits.device.type == "cuda", num_warps=8)
    return indices.gather(1, values.argmax(dim=1, keepdim=True)).squeeze(1)  # [B]
