"""y [M, N] = x [M, K] @ W [N, K]^T (+ bias) for decode-sized M <= 128, split over N and K so every SM streams a
slab of W once. Traffic: W once from HBM; each N tile re-reads its x slab from L2; split K adds fp32 partials
(M x N x 4 bytes per split, written and re-read through L2). Reference: grm_engine.decode.models.linear
(linear_reference; skinny_linear is the dispatcher).

Why split K, and how the partials meet. cuBLAS gives a decode-sized GEMM with small N (Qwen2.5-0.5B's o_proj:
896 / 64 = 14 tiles) to a handful of SMs that stream K serially; most of the 132 SMs idle (3.9 us for a 0.38 us
weight read). Here a program owns one [BLOCK_N] tile of outputs and one K range, so tiles x splits programs fill
the GPU. The K partials are combined in the same launch: each program writes its fp32 partial to a workspace,
then bumps a per-tile counter (one acq_rel atomic); the program that arrives last sums the tile's partials in
split order, adds the bias, writes y and resets the counter to 0 for the next call. Against the other options:
fp32 atomics into a zeroed buffer need a memset and a cast launch (three launches, and an order of additions
that changes from run to run); a separate reduce kernel is two launches. At these sizes a launch (~1-2 us inside
a CUDA graph) costs more than the whole weight read, so one launch wins; the fixed summation order keeps y
bit-identical from run to run. The price is a serial tail: the last program re-reads split x BLOCK_M x BLOCK_N
fp32 values, so default_config caps that at TAIL_ELEMENTS.

CUDA graphs: nothing is read back to the host; the workspace (partials + counters) is one arena per device that
grows only outside capture and is never freed (a captured graph keeps pointing at it). Calls on one stream are
ordered, so they may share it; two streams running skinny linears at the same time must not (the decoder has one).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 128  # x fits one tile of rows; more rows are a GEMM for cuBLAS
TAIL_ELEMENTS = 16384  # fp32 partials (64 KB) the last program of a tile may re-read: ~0.3 us from L2 on one SM


@triton.jit
def _skinny_linear_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr,
                          rows, out_features, in_features, stride_x, stride_weight, stride_out, k_per_split,
                          HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    split = tl.program_id(0)
    tile = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    m_mask = m < rows
    n_mask = n < out_features
    x_ptrs = x_ptr + m[:, None].to(tl.int64) * stride_x + k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = weight_ptr + n[:, None].to(tl.int64) * stride_weight + k[None, :]  # [BLOCK_N, BLOCK_K]
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:  # K is a multiple of BLOCK_K: only rows past M / N are masked
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + k) < in_features
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    if SPLIT_K > 1:
        tile_offsets = m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [BLOCK_M, BLOCK_N] in one partial
        tile_base = partial_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(tile_base + split * (BLOCK_M * BLOCK_N) + tile_offsets, acc)
        tl.debug_barrier()  # every thread's partial is written before one thread's release below publishes them
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the tile's partials are all written: sum in split order (same bits every run)
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                if s == split:  # this program's own partial is still in registers
                    total += acc
                else:  # from L2 (.cg: not this SM's L1), another SM wrote it
                    total += tl.load(tile_base + s * (BLOCK_M * BLOCK_N) + tile_offsets, cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")  # zero again for the next call
            _store_output(total, bias_ptr, out_ptr, m, n, m_mask, n_mask, stride_out, HAS_BIAS)
    else:
        _store_output(acc, bias_ptr, out_ptr, m, n, m_mask, n_mask, stride_out, HAS_BIAS)


@triton.jit
def _store_output(acc, bias_ptr, out_ptr, m, n, m_mask, n_mask, stride_out, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 (+ bias in fp32), rounded once to the output dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None].to(tl.int64) * stride_out + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch parameters. split_k is an upper bound: the launcher balances K chunks of block_k over the splits."""

    block_n: int = 32
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def block_rows(rows: int) -> int:
    """BLOCK_M: the rows rounded up to a power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, triton.next_power_of_2(rows))


def balanced_split(split_k: int, in_features: int, block_k: int) -> tuple[int, int]:
    """-> (splits actually launched, K per split, a multiple of block_k): no split is empty."""
    chunks = triton.cdiv(in_features, block_k)
    per_split = triton.cdiv(chunks, max(1, min(split_k, chunks)))
    return triton.cdiv(chunks, per_split), per_split * block_k


@functools.lru_cache(maxsize=4096)  # eager decode steps ask once per projection per step
def default_config(rows: int, out_features: int, in_features: int, num_sms: int = 132) -> SkinnyConfig:
    """The launch for one shape, by a small model of what costs. For each N tile (32, 64, 128): split K until
    tiles x splits reach num_sms programs (at most TAIL_ELEMENTS / (BLOCK_M x BLOCK_N) splits); count the bytes
    moved through L2 (W once, x once per N tile, fp32 partials written and re-read) and scale by how much of the
    GPU sits idle when there are fewer programs than SMs; keep the cheapest. Narrow tiles fill the GPU without
    splitting, wide ones re-read x less (which matters at 64-128 rows and large K). Measured alternatives:
    bench/gpu_skinny_linear.py (its sweep prints the best config per shape)."""
    block_m = block_rows(rows)
    block_k = 128 if block_m <= 64 else 64
    best = None
    for block_n in (32, 64, 128):
        tiles = triton.cdiv(out_features, block_n)
        wanted = max(1, round(num_sms / tiles))
        split, _ = balanced_split(min(wanted, max(1, TAIL_ELEMENTS // (block_m * block_n))), in_features, block_k)
        moved = out_features * in_features * 2 * (1 + rows / block_n) + (split > 1) * split * rows * out_features * 8
        cost = moved * max(1.0, num_sms / (tiles * split))
        if best is None or cost < best[0]:
            best = (cost, SkinnyConfig(block_n, block_k, split, 4, 4 if block_m <= 32 else 3))
    return best[1]


# Measured launches that beat default_config, by (N, K, BLOCK_M): filled from bench/gpu_skinny_linear.py's sweep
# (its summary prints the entries to paste) once a GPU session has measured them; empty until then.
TUNED: dict[tuple[int, int, int], SkinnyConfig] = {}


def choose_config(rows: int, out_features: int, in_features: int, num_sms: int) -> SkinnyConfig:
    """A measured entry of TUNED for this shape, else default_config."""
    tuned = TUNED.get((out_features, in_features, block_rows(rows)))
    return tuned if tuned is not None else default_config(rows, out_features, in_features, num_sms)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


_WORKSPACES: dict = {}  # device -> (partials fp32, counters int32 zeros)
_OUTGROWN: list = []  # arenas replaced by larger ones: kept alive, a captured CUDA graph may still use them


def workspace(device: torch.device, partial_elements: int, num_counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's arena, grown (outside CUDA-graph capture only) to hold this launch's partials and counters."""
    partials, counters = _WORKSPACES.get(device, (None, None))
    if partials is not None and partials.numel() >= partial_elements and counters.numel() >= num_counters:
        return partials, counters
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"skinny_linear: its split-K workspace must grow to {partial_elements} fp32 partials and "
                           f"{num_counters} counters, which cannot happen while a CUDA graph is captured; run the "
                           "same call once before capturing (as the decoder's warm-up step does)")
    if partials is not None:
        _OUTGROWN.append((partials, counters))
        partial_elements, num_counters = max(partial_elements, partials.numel()), max(num_counters, counters.numel())
    partials = torch.empty(triton.next_power_of_2(partial_elements), device=device, dtype=torch.float32)
    counters = torch.zeros(triton.next_power_of_2(num_counters), device=device, dtype=torch.int32)
    _WORKSPACES[device] = (partials, counters)
    return partials, counters


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         config: SkinnyConfig | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, unit column stride, any row stride) @ weight [N, K]^T (+ bias [N]) -> [M, N] in
    x's dtype. The caller checks shapes and dtypes (grm_engine.decode.models.linear.skinny_linear)."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    assert rows <= MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1, "skinny_linear_triton: checked inputs"
    out = torch.empty(rows, out_features, device=x.device, dtype=x.dtype)
    if rows == 0 or out_features == 0:
        return out
    if in_features == 0:
        return out.copy_(bias.expand_as(out) if bias is not None else torch.zeros_like(out))
    config = config or choose_config(rows, out_features, in_features, _num_sms(x.device))
    block_m = block_rows(rows)
    split, k_per_split = balanced_split(config.split_k, in_features, config.block_k)
    tiles = triton.cdiv(out_features, config.block_n)
    partials = counters = out  # unused without a split
    if split > 1:
        partials, counters = workspace(x.device, tiles * split * block_m * config.block_n, tiles)
    _skinny_linear_kernel[(split, tiles)](
        x, weight, bias if bias is not None else out, out, partials, counters,
        rows, out_features, in_features, x.stride(0), weight.stride(0), out.stride(0), k_per_split,
        HAS_BIAS=bias is not None, SPLIT_K=split, EVEN_K=in_features % config.block_k == 0,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out
