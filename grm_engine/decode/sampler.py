"""Token sampling with counter-based noise: greedy, temperature, top-k, top-p.

Sampling is the Gumbel-max trick: token = argmax(logits / T + g) over the tokens top-k/top-p keep, with
g = -log(-log(u)) and u a hash of (seed, request, sample index, position, token id). The specification
(`uniform_noise_reference`) uses int64 torch ops on 32-bit values with multipliers below 2**31 (no
overflow), so CPU and GPU draw the same u, and a sample's tokens do not depend on batch composition, step
order or preemption. `uniform_noise`, used by `sample`, computes the same bits on int32 tensors holding the
32-bit patterns (multiplication wraps mod 2**32 on CPU and CUDA; right shifts are made logical by masking),
in place, with the per-token half of the hash cached: half the bytes and fewer [B, V] temporaries; on
CUDA it is one Triton kernel (noise_triton.py) that only writes u.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
# (2**24 - 1 + 0.5) / 2**24 rounds to exactly 1.0 in fp32, and u = 1 makes the Gumbel noise +inf: that token
# would win whatever its logit or filter (~V / 2**24 of the rows, 0.9% at V = 152k). u is capped at the
# largest fp32 below 1 instead.
U_MAX = 1.0 - 2.0**-24


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (xor-shift-multiply) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & MASK32
    return x ^ (x >> 16)


def row_keys(keys: torch.Tensor) -> torch.Tensor:
    """keys [B, 4] int64 (seed, request, sample, position) -> one 32-bit state per row [B]."""
    seed = keys[:, 0]
    h = mix32((seed >> 32) & MASK32 ^ 0x243F6A88)
    h = mix32(h ^ (seed & MASK32))
    for column, salt in ((1, 0x13198A2E), (2, 0x03707344), (3, 0x299F31D0)):
        h = mix32(h ^ mix32((keys[:, column] & MASK32) ^ salt))
    return h


def mix32_numpy(x: np.ndarray) -> np.ndarray:
    """mix32 on a uint64 numpy array holding values in [0, 2**32) (host side, for the per-row half)."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(MASK32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x5BD1E995)) & np.uint64(MASK32)
    return x ^ (x >> np.uint64(16))


def row_hash_numpy(keys: np.ndarray) -> np.ndarray:
    """row_keys on the host: keys [B, 4] int64/uint64 -> [B] int32 holding the 32-bit row states (as
    to_int32_bits(row_keys(keys))). Saves the ~50 tiny device ops of row_keys per step."""
    keys = keys.astype(np.uint64)
    m = np.uint64(MASK32)
    seed = keys[:, 0]
    h = mix32_numpy(((seed >> np.uint64(32)) & m) ^ np.uint64(0x243F6A88))
    h = mix32_numpy(h ^ (seed & m))
    for column, salt in ((1, 0x13198A2E), (2, 0x03707344), (3, 0x299F31D0)):
        h = mix32_numpy(h ^ mix32_numpy((keys[:, column] & m) ^ np.uint64(salt)))
    return h.astype(np.uint32).view(np.int32)


def uniform_noise_reference(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, 4] keys -> u [B, V] in (0, 1), 24 random bits each, a pure function of (key row, token id)."""
    token_ids = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    token_hash = mix32(token_ids ^ 0x082EFA98)  # [V]
    bits = mix32(row_keys(keys)[:, None] ^ token_hash[None, :])  # [B, V]
    return (((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp_max(U_MAX)


def to_int32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 tensor with the same 32-bit pattern (explicit, no cast overflow)."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def mix32_int32_(x: torch.Tensor) -> torch.Tensor:
    """mix32 on int32 bit patterns, in place. x >> s is arithmetic on int32; masking the top s bits makes it
    the logical shift of the uint32 reference; x * c wraps mod 2**32, as (x * c) & MASK32 does in int64."""
    x ^= (x >> 16).bitwise_and_(0xFFFF)
    x.mul_(0x7FEB352D)
    x ^= (x >> 15).bitwise_and_(0x1FFFF)
    x.mul_(0x5BD1E995)
    x ^= (x >> 16).bitwise_and_(0xFFFF)
    return x


@functools.lru_cache(maxsize=8)
def token_hash_int32(vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] int32: mix32(token_id ^ salt), the key-independent half of the noise hash (same every step)."""
    token_ids = torch.arange(vocab_size, device=device, dtype=torch.int64)
    return to_int32_bits(mix32(token_ids ^ 0x082EFA98))


def uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Same u as uniform_noise_reference, bit for bit: [B, 4] int64 keys, or [B] int32 row hashes
    (row_hash_numpy, computed on the host) -> [B, V] fp32."""
    row_hash = keys if keys.dim() == 1 else to_int32_bits(row_keys(keys))  # [B] int32
    if row_hash.dtype != torch.int32:
        raise TypeError(f"uniform_noise: row hashes must be int32, got {row_hash.dtype}")
    from .attention import attention_backend

    if attention_backend(row_hash.device) == "triton":  # CUDA: one fused kernel (noise_triton.py)
        from .noise_triton import uniform_noise_triton

        return uniform_noise_triton(row_hash, vocab_size)
    bits = row_hash[:, None] ^ token_hash_int32(vocab_size, keys.device)[None, :]  # [B, V] int32
    mix32_int32_(bits)
    bits >>= 8  # the top 24 bits; the mask below undoes the sign extension
    u = bits.bitwise_and_(0xFFFFFF).float()  # exact: 24-bit integers
    return u.add_(0.5).mul_(1.0 / (1 << 24)).clamp_max_(U_MAX)


def top_k_top_p_mask(scaled_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: tokens kept by top-k (k > 0) and top-p (nucleus: the smallest set of most likely
    tokens whose probability reaches p; the most likely token is always kept)."""
    sorted_logits, order = torch.sort(scaled_logits, dim=-1, descending=True, stable=True)
    rank = torch.arange(scaled_logits.shape[-1], device=scaled_logits.device)[None, :]
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep_sorted = (mass_before < top_p[:, None]) | (rank == 0)
    keep_sorted &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           keys: torch.Tensor, want_logprobs: bool = False, *, all_greedy: bool | None = None,
           any_filter: bool | None = None, any_greedy: bool | None = None,
           noise=uniform_noise) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] fp32; temperature, top_p [B] float; top_k [B] int; keys [B, 4] int64 (or [B] int32 row
    hashes from row_hash_numpy, with the default noise).
    Returns tokens [B] int64 and, if asked, log_softmax(logits / T)[token] [B] (T = 1 for greedy rows).
    all_greedy / any_filter / any_greedy may be given by a caller that knows them, to save a device sync or
    a [B, V] pass each. noise: uniform_noise or the reference (tests)."""
    greedy = temperature <= 0
    divisor = torch.where(greedy, torch.ones_like(temperature), temperature)  # [B]
    scaled = None  # logits / divisor [B, V], built only when a filter or the log-probs need it
    if all_greedy is None:
        all_greedy = bool(greedy.all())
    tokens = torch.argmax(logits, dim=-1) if all_greedy or any_greedy is not False else None
    if not all_greedy:
        if any_filter is None:
            any_filter = bool(((top_k > 0) | (top_p < 1)).any())
        if not any_filter and noise is uniform_noise and keys.dim() == 1 and _fused_draw(logits):
            # CUDA: noise, Gumbel transform and argmax in one pass over the logits, the same token
            from .noise_triton import gumbel_argmax_triton

            sampled = gumbel_argmax_triton(logits, divisor, keys)
        else:
            scaled = logits / divisor[:, None]
            filtered = scaled
            if any_filter:
                filtered = scaled.masked_fill(~top_k_top_p_mask(scaled, top_k, top_p), float("-inf"))
            # -log(-log(u)) + filtered, in place: the same float ops as the unfused expression
            perturbed = noise(keys, logits.shape[-1]).log_().neg_().log_().neg_().add_(filtered)
            sampled = torch.argmax(perturbed, dim=-1)
        tokens = sampled if tokens is None else torch.where(greedy, tokens, sampled)
    logprobs = None
    if want_logprobs:
        scaled = logits / divisor[:, None] if scaled is None else scaled
        logprobs = torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def _fused_draw(logits: torch.Tensor) -> bool:
    from .attention import attention_backend

    return attention_backend(logits.device) == "triton" and logits.stride(-1) == 1
