"""Fused routed experts of a mixture-of-experts layer (DeepSeek-V2): the (token, expert) pairs are sorted by expert
and padded to whole row blocks, then two grouped GEMMs run over them: gate/up with SiLU(gate) * up fused into the
epilogue, and down with the routing weight fused in; the k pairs of a token are summed last (fp32, no atomics).
Traffic: each row block reads its expert's weight tiles once (at decode, about one block per expert: every
active expert's weights are read once per step), plus the [pairs, moe_intermediate] activations twice.
Reference: grm_engine.decode.models.moe.routed_experts_reference (a loop over experts, as transformers).
Everything runs on the device without a host sync (capturable in a CUDA graph).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """topk_ids [T, K] -> (sorted_pairs [P_max] int32, block_experts [P_max / block_m] int32).
    sorted_pairs lists pair indices (t * K + k) grouped by expert, each expert's run padded to a multiple of block_m
    with the sentinel T * K; block_experts gives each row block's expert (num_experts for blocks past the end).
    P_max = T * K + num_experts * (block_m - 1), rounded up to block_m: shapes depend on T only."""
    num_pairs = topk_ids.numel()
    flat = topk_ids.reshape(-1).long()  # [P]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)  # [P] pair indices by expert
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts  # [E] rank of an expert's first pair in `order`
    rank = torch.arange(num_pairs, device=flat.device) - first_of_expert[sorted_experts]
    destination = (ends - padded)[sorted_experts] + rank
    max_padded = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_pairs = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[destination] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=flat.device)
    block_experts = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)  # == E past the last run
    return sorted_pairs, block_experts


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, sorted_pairs_ptr, block_experts_ptr, out_ptr, num_pairs,
                    stride_xt, stride_we, stride_wn, stride_wk, stride_ot,
                    TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr, INTER: tl.constexpr, HIDDEN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    block = tl.program_id(0)
    n_tile = tl.program_id(1)
    expert = tl.load(block_experts_ptr + block)
    if expert < NUM_EXPERTS:
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pairs_ptr + rows)  # [BLOCK_M]
        valid = pair < num_pairs
        token = (pair // TOP_K).to(tl.int64)
        n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < INTER
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, HIDDEN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < HIDDEN
            a = tl.load(x_ptr + token[:, None] * stride_xt + k[None, :], mask=valid[:, None] & k_mask[None, :],
                        other=0.0)  # [BLOCK_M, BLOCK_K]
            w_mask = k_mask[:, None] & n_mask[None, :]
            w_gate = tl.load(w_base + n[None, :] * stride_wn + k[:, None] * stride_wk, mask=w_mask, other=0.0)
            w_up = tl.load(w_base + (n + INTER)[None, :] * stride_wn + k[:, None] * stride_wk, mask=w_mask, other=0.0)
            acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # SiLU(gate) * up
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_ot + n[None, :], h.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, sorted_pairs_ptr, block_experts_ptr, weights_ptr, out_ptr, num_pairs,
                 stride_ht, stride_we, stride_wn, stride_wk,
                 NUM_EXPERTS: tl.constexpr, INTER: tl.constexpr, HIDDEN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    block = tl.program_id(0)
    n_tile = tl.program_id(1)
    expert = tl.load(block_experts_ptr + block)
    if expert < NUM_EXPERTS:
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pairs_ptr + rows)
        valid = pair < num_pairs
        pair64 = pair.to(tl.int64)
        n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < HIDDEN
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < INTER
            a = tl.load(h_ptr + pair64[:, None] * stride_ht + k[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + n[None, :] * stride_wn + k[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :],
                        other=0.0)  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        routing_weight = tl.load(weights_ptr + pair64, mask=valid, other=0.0)  # fp32
        acc = acc * routing_weight[:, None]
        tl.store(out_ptr + pair64[:, None] * HIDDEN + n[None, :], acc, mask=valid[:, None] & n_mask[None, :])


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor, *, block_m: int | None = None, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x [T, H]; topk_ids [T, K] (expert of each pair); topk_weights [T, K] (fp32 routing weights);
    gate_up [E, 2 * I, H] (gate rows then up rows, as transformers stores experts); down [E, H, I].
    Returns sum_k weight[t, k] * down_e(SiLU(gate_e(x_t)) * up_e(x_t)) [T, H] in x's dtype (fp32 accumulation)."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    assert gate_up.shape[2] == hidden and down.shape == (num_experts, hidden, inter), \
        f"fused_moe: gate_up {list(gate_up.shape)} and down {list(down.shape)} do not fit hidden {hidden}"
    assert x.stride(1) == 1 and gate_up.stride(2) == 1 and down.stride(2) == 1, "fused_moe: rows must be contiguous"
    num_pairs = num_tokens * top_k
    if num_tokens == 0:
        return torch.zeros_like(x)
    if block_m is None:  # one row block per expert where possible: each block reads its expert's weights again
        block_m = min(64, max(16, triton.next_power_of_2(-(-3 * num_pairs // (2 * num_experts)))))
    sorted_pairs, block_experts = align_by_expert(topk_ids, num_experts, block_m)
    num_blocks = block_experts.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [P, I]
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n))](
        x, gate_up, sorted_pairs, block_experts, h, num_pairs,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), h.stride(0),
        TOP_K=top_k, NUM_EXPERTS=num_experts, INTER=inter, HIDDEN=hidden,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=precision, num_warps=4)
    out_pairs = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)  # [P, H] weighted
    weights = topk_weights.reshape(-1).float().contiguous()
    _down_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        h, down, sorted_pairs, block_experts, weights, out_pairs, num_pairs,
        h.stride(0), down.stride(0), down.stride(1), down.stride(2),
        NUM_EXPERTS=num_experts, INTER=inter, HIDDEN=hidden,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=precision, num_warps=4)
    return out_pairs.view(num_tokens, top_k, hidden).sum(1).to(x.dtype)
