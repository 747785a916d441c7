"""Rotary embedding of q and k (rotate-half convention) fused with storing k and v into the KV pages: one
program per token, every head; q and k are rotated in place. Traffic: q, k, v read once, q and k written once,
k and v written once into the pages (the unfused ops take 11 launches). The kernel asks for the rounding of each
PyTorch op (x*cos and rotate(x)*sin rounded to the model dtype, then their sum); the interpreter matches the
reference bit for bit, the compiled kernel within one rounding (on the H200 ~12% of bf16 elements differ by one
ulp: the compiler fuses a multiply-add). Reference: RotaryEmbedding.rotate (grm_engine.decode.models.layers) + store_kv_reference (attention.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_rows(ptr, stride_token, cos, sin, token, heads, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotates the [heads, HEAD_DIM] rows of one token in place; returns nothing."""
    half: tl.constexpr = HEAD_DIM // 2
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < heads
    base = ptr + token * stride_token + h * HEAD_DIM
    x = tl.load(base + d, mask=mask, other=0.0)
    partner = tl.load(base + (d + half) % HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    rotated = tl.where(d < half, -partner, partner).to(x.dtype)
    a = (x.to(tl.float32) * cos).to(x.dtype).to(tl.float32)
    b = (rotated.to(tl.float32) * sin).to(x.dtype).to(tl.float32)
    tl.debug_barrier()  # every thread has read its partners before any thread overwrites them
    tl.store(base + d, (a + b).to(x.dtype), mask=mask)


@triton.jit
def _rotary_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                         stride_q, stride_k, stride_v, stride_cos, num_heads, kv_heads,
                         HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)[None, :]
    cos = tl.load(cos_ptr + token * stride_cos + d).to(tl.float32)  # [1, D]
    sin = tl.load(sin_ptr + token * stride_cos + d).to(tl.float32)
    _rotate_rows(q_ptr, stride_q, cos, sin, token, num_heads, HEAD_DIM, BLOCK_H)
    _rotate_rows(k_ptr, stride_k, cos, sin, token, kv_heads, HEAD_DIM, BLOCK_KV)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:  # negative slots are padding rows
        tl.debug_barrier()  # this program's rotated k rows are visible to its own loads below
        h = tl.arange(0, BLOCK_KV)[:, None]
        mask = h < kv_heads
        row = kv_heads * HEAD_DIM
        k = tl.load(k_ptr + token * stride_k + h * HEAD_DIM + d, mask=mask)
        v = tl.load(v_ptr + token * stride_v + h * HEAD_DIM + d, mask=mask)
        tl.store(k_cache_ptr + slot * row + h * HEAD_DIM + d, k, mask=mask)
        tl.store(v_cache_ptr + slot * row + h * HEAD_DIM + d, v, mask=mask)


def rotary_store_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """q [T, H, D], k, v [T, kv_heads, D] (each token's heads contiguous); cos, sin [T, 1, D]; caches
    [num_blocks, block_size, kv_heads, D] contiguous; slot_mapping [T] (negative: skip). q, k rotated in place."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, f"rotary_store_triton: {name}'s heads must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "rotary_store_triton: caches must be contiguous"
    assert head_dim & (head_dim - 1) == 0, "rotary_store_triton: head_dim must be a power of two"
    assert cos.stride(-1) == 1 and cos.stride() == sin.stride()
    if num_tokens == 0:
        return
    _rotary_store_kernel[(num_tokens,)](q, k, v, cos, sin, k_cache, v_cache, slot_mapping, q.stride(0), k.stride(0),
                                        v.stride(0), cos.stride(0), num_heads, kv_heads, HEAD_DIM=head_dim,
                                        BLOCK_H=triton.next_power_of_2(num_heads),
                                        BLOCK_KV=triton.next_power_of_2(kv_heads), num_warps=4)
