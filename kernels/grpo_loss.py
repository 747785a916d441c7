"""Fused GRPO loss over logits [B, T, V]: one program per (b, t) row computes log_softmax(x / T)[id] by an online
fp32 log-sum-exp and TRL's per-token loss; a second kernel writes dlogits = c * (onehot - softmax), in place into
the logits by default. Traffic: an unmasked row is read, then read and written; a masked row is only zero-filled;
a per-sequence prologue reads the ids and the mask once. Reference: grm_engine.loss.grpo_loss_reference.

No host sync stands before the big kernels: the token-id range check runs on the GPU (token_id_check.py),
its flag is copied to pinned memory right behind it, and the host waits for that copy only after the big kernels
are queued. Every gather index is clamped into [0, V), so a bad id never reads out of bounds, and the gradient is
not written when the flag is set, so a failed call leaves the logits as they were. Non-finite advantages, rewards or
old/ref log-probs (at completion positions) set the same flag (bit 2, in the same prologue kernel: token_id_check.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from grm_engine.loss import LOG_RATIO_MAX, GRPOStats, check_finite_inputs

from .token_id_check import FlagReader, check_sequences, raise_bad_token_ids

LOG2E = 1.4426950408889634  # host side: folded into the scale argument
LN2 = tl.constexpr(0.6931471805599453)  # used inside kernels: Triton needs constexpr globals
NUM_STATS = 4  # per-row stats: weighted loss, kl, clipped, completion token
STATS_WIDTH = tl.constexpr(NUM_STATS)  # the same, for kernels (a jit function reads constexpr globals only)
SCALE_PROGRAMS = 2048  # _scale_rows_kernel's grid: returns at once when the upstream gradient is 1


@triton.jit
def _grpo_row(
    program_row,
    logits_ptr, stride_lb, stride_lt, STRIDE_LV: tl.constexpr,  # [B, T, V], any strides
    grad_ptr, stride_gb, stride_gt, STRIDE_GV: tl.constexpr,  # [B, T, V] dlogits (may alias logits)
    ids_ptr, stride_ib, stride_it,  # [B, T] int
    mask_ptr, stride_mb, stride_mt,  # [B, T] any dtype, nonzero = completion token (HAS_MASK; else all are)
    count_ptr, stride_cb, stride_ct,  # [B, T] view of the token count that divides this token's weight (HAS_COUNT)
    adv_ptr, stride_ab, stride_at,  # [B, T] view (stride_at = 0 for per-sequence advantages)
    rewards_ptr,  # [B] fp32, when the advantage is computed here from group rewards
    old_ptr, stride_ob, stride_ot,
    ref_ptr, stride_rb, stride_rt,
    flag_ptr,  # int32, 1 when a completion id is outside [0, V): the gradient is then not written
    logp_out, entropy_out,  # [B*T] fp32
    stats_out,  # [B*T, STATS_WIDTH] fp32: weight * loss, kl, clipped, 1 (0 everywhere for a masked token)
    lse_out, coef_out,  # [B*T] fp32: base-2 LSE of x / T and d loss / d logit scale, for _grad_rows_kernel
    T, V, weight_factor, scale2, inv_temp, beta, eps_low, eps_high, reward_eps, log_ratio_max,
    GROUP_SIZE: tl.constexpr, GROUP_BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COUNT: tl.constexpr,
    HAS_REWARDS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.cast(program_row, tl.int64)  # int64: B*T*V exceeds 2**31 at real sizes
    b = row // T
    t = row % T
    offs = tl.arange(0, BLOCK_V)
    num_chunks = tl.cdiv(V, BLOCK_V)
    valid = tl.full([], 1, tl.int1)
    if HAS_MASK:
        valid = tl.load(mask_ptr + b * stride_mb + t * stride_mt) != 0
    if valid:
        x_row = logits_ptr + b * stride_lb + t * stride_lt
        # online log-sum-exp in base 2 (x2 = logit * log2(e) / T); m starts finite so -inf logits give 0, not NaN
        m = tl.full([], -3.0e38, tl.float32)
        s = tl.zeros([], tl.float32)
        ent = tl.zeros([], tl.float32)  # sum of e * (x2 - m): entropy without cancellation
        for i in range(0, num_chunks):
            cols = i * BLOCK_V + offs
            x = tl.load(x_row + cols * STRIDE_LV, mask=cols < V, other=float("-inf")).to(tl.float32) * scale2
            m_new = tl.maximum(m, tl.max(x, axis=0))
            alpha = tl.exp2(m - m_new)
            e = tl.exp2(x - m_new)
            if COMPUTE_ENTROPY:
                shift = tl.where(s > 0, s * (m - m_new), 0.0)
                ent = alpha * (ent + shift) + tl.sum(tl.where(e > 0, e * (x - m_new), 0.0), axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        lse2 = m + tl.log2(s)
        # clamped: an id outside [0, V) (reported by the host from the flag) reads inside the row
        token = tl.load(ids_ptr + b * stride_ib + t * stride_it).to(tl.int64)
        token = tl.minimum(tl.maximum(token, 0), V - 1)
        x_token = tl.load(x_row + token * STRIDE_LV).to(tl.float32) * scale2
        logp = (x_token - lse2) * LN2
        tl.store(logp_out + row, logp)
        if COMPUTE_ENTROPY:
            tl.store(entropy_out + row, (tl.log2(s) - ent / s) * LN2)
        if COMPUTE_LOSS:
            # the reduction weight (grm_engine.loss.token_weights): 1 / (max(count, 1) * factor)
            w = tl.math.div_rn(1.0, weight_factor)
            if HAS_COUNT:
                count = tl.load(count_ptr + b * stride_cb + t * stride_ct).to(tl.float32)
                w = tl.math.div_rn(1.0, tl.maximum(count, 1.0) * weight_factor)
            if HAS_REWARDS:  # group advantage: (r - mean) / (unbiased std + eps) over this sample's group
                group_start = (b // GROUP_SIZE) * GROUP_SIZE
                goffs = tl.arange(0, GROUP_BLOCK)
                gmask = goffs < GROUP_SIZE
                rewards = tl.load(rewards_ptr + group_start + goffs, mask=gmask, other=0.0)
                mean = tl.sum(rewards, axis=0) / GROUP_SIZE
                var = tl.sum(tl.where(gmask, (rewards - mean) * (rewards - mean), 0.0), axis=0) / (GROUP_SIZE - 1)
                adv = (tl.load(rewards_ptr + b) - mean) / (tl.sqrt(var) + reward_eps)
            else:
                adv = tl.load(adv_ptr + b * stride_ab + t * stride_at).to(tl.float32)
            if HAS_OLD:
                log_ratio = logp - tl.load(old_ptr + b * stride_ob + t * stride_ot).to(tl.float32)
                ratio = tl.exp(tl.minimum(log_ratio, log_ratio_max))
                dratio = tl.where(log_ratio <= log_ratio_max, ratio, 0.0)  # clamp passes no gradient beyond
            else:  # ratio exp(logp - logp.detach()) = 1 with gradient 1 (none for a -inf logp)
                ratio = tl.full([], 1.0, tl.float32)
                dratio = tl.where(logp > float("-inf"), 1.0, 0.0)
            clipped_ratio = tl.minimum(tl.maximum(ratio, 1 - eps_low), 1 + eps_high)
            loss_tok = -tl.minimum(ratio * adv, clipped_ratio * adv)
            is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
            dloss = tl.where(is_clipped, 0.0, -adv * dratio)  # d loss_tok / d logp
            kl = tl.zeros([], tl.float32)
            if HAS_REF:
                ref_gap = tl.load(ref_ptr + b * stride_rb + t * stride_rt).to(tl.float32) - logp
                gap = tl.minimum(ref_gap, log_ratio_max)
                exp_gap = tl.exp(gap)
                kl = exp_gap - gap - 1
                loss_tok += beta * kl
                dloss += beta * tl.where(ref_gap <= log_ratio_max, 1 - exp_gap, 0.0)
            stats_row = stats_out + row * STATS_WIDTH
            tl.store(stats_row, w * loss_tok)
            tl.store(stats_row + 1, kl)
            tl.store(stats_row + 2, is_clipped.to(tl.float32))
            tl.store(stats_row + 3, 1.0)
            coef = w * dloss * inv_temp  # d loss / d logit_v = coef * (onehot_v - softmax_v)
            tl.store(lse_out + row, lse2)
            tl.store(coef_out + row, coef)
            if WRITE_GRAD:
                if tl.load(flag_ptr) == 0:
                    g_row = grad_ptr + b * stride_gb + t * stride_gt
                    for i in range(0, num_chunks):
                        cols = (num_chunks - 1 - i) * BLOCK_V + offs  # reversed: the last chunks read are in L2
                        x = tl.load(x_row + cols * STRIDE_LV, mask=cols < V, other=float("-inf"))
                        p = tl.exp2(x.to(tl.float32) * scale2 - lse2)
                        grad = tl.where(cols == token, coef - coef * p, -coef * p)
                        tl.store(g_row + cols * STRIDE_GV, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)
    else:  # masked token: logits never read; outputs 0; its gradient row is zero-filled
        tl.store(logp_out + row, 0.0)
        if COMPUTE_ENTROPY:
            tl.store(entropy_out + row, 0.0)
        if COMPUTE_LOSS:
            stats_row = stats_out + row * STATS_WIDTH
            for k in tl.static_range(STATS_WIDTH):
                tl.store(stats_row + k, 0.0)
            tl.store(lse_out + row, 0.0)
            tl.store(coef_out + row, 0.0)
            if WRITE_GRAD:
                if tl.load(flag_ptr) == 0:
                    g_row = grad_ptr + b * stride_gb + t * stride_gt
                    zeros = tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty)
                    for i in range(0, num_chunks):
                        cols = i * BLOCK_V + offs
                        tl.store(g_row + cols * STRIDE_GV, zeros, mask=cols < V)


@triton.jit
def _grpo_rows_kernel(
    logits_ptr, stride_lb, stride_lt, STRIDE_LV: tl.constexpr, grad_ptr, stride_gb, stride_gt,
    STRIDE_GV: tl.constexpr, ids_ptr, stride_ib, stride_it, mask_ptr, stride_mb, stride_mt, count_ptr, stride_cb,
    stride_ct, adv_ptr, stride_ab, stride_at, rewards_ptr, old_ptr, stride_ob, stride_ot, ref_ptr, stride_rb,
    stride_rt, flag_ptr, logp_out, entropy_out, stats_out, lse_out, coef_out,
    num_rows, T, V, weight_factor, scale2, inv_temp, beta, eps_low, eps_high, reward_eps, log_ratio_max,
    GROUP_SIZE: tl.constexpr, GROUP_BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COUNT: tl.constexpr,
    HAS_REWARDS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr, PERSISTENT: tl.constexpr,
):
    # Arguments as in _grpo_row. The vocabulary strides are constexpr, so a contiguous last dimension is known to
    # be contiguous (other strides compile their own variant). PERSISTENT: fewer programs than rows, each striding
    # over rows, which bounds how many rows are in flight so that the second sweep may find its row in L2.
    if PERSISTENT:
        for program_row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
            _grpo_row(
                program_row, logits_ptr, stride_lb, stride_lt, STRIDE_LV, grad_ptr, stride_gb, stride_gt, STRIDE_GV,
                ids_ptr, stride_ib, stride_it, mask_ptr, stride_mb, stride_mt, count_ptr, stride_cb, stride_ct,
                adv_ptr, stride_ab, stride_at, rewards_ptr, old_ptr, stride_ob, stride_ot, ref_ptr, stride_rb,
                stride_rt, flag_ptr, logp_out, entropy_out, stats_out, lse_out, coef_out, T, V, weight_factor, scale2,
                inv_temp, beta, eps_low, eps_high, reward_eps, log_ratio_max, GROUP_SIZE, GROUP_BLOCK, HAS_MASK,
                HAS_COUNT, HAS_REWARDS, HAS_OLD, HAS_REF, COMPUTE_LOSS, WRITE_GRAD, COMPUTE_ENTROPY, BLOCK_V
            )
    else:  # one row per program: no outer loop, so the sweeps over the row pipeline their loads
        _grpo_row(
            tl.program_id(0), logits_ptr, stride_lb, stride_lt, STRIDE_LV, grad_ptr, stride_gb, stride_gt, STRIDE_GV,
            ids_ptr, stride_ib, stride_it, mask_ptr, stride_mb, stride_mt, count_ptr, stride_cb, stride_ct, adv_ptr,
            stride_ab, stride_at, rewards_ptr, old_ptr, stride_ob, stride_ot, ref_ptr, stride_rb, stride_rt,
            flag_ptr, logp_out, entropy_out, stats_out, lse_out, coef_out, T, V, weight_factor, scale2, inv_temp,
            beta, eps_low, eps_high, reward_eps, log_ratio_max, GROUP_SIZE, GROUP_BLOCK, HAS_MASK, HAS_COUNT,
            HAS_REWARDS, HAS_OLD, HAS_REF, COMPUTE_LOSS, WRITE_GRAD, COMPUTE_ENTROPY, BLOCK_V
        )


@triton.jit
def _grad_rows_kernel(
    logits_ptr, stride_lb, stride_lt, STRIDE_LV: tl.constexpr,  # [B, T, V]
    grad_ptr, stride_gb, stride_gt, STRIDE_GV: tl.constexpr,  # [B, T, V] (may alias logits)
    ids_ptr, stride_ib, stride_it,  # [B, T]
    lse_ptr, coef_ptr,  # [B*T] fp32, from the loss kernel
    flag_ptr,  # int32: 1 when a completion id is outside [0, V): nothing is written
    T, V: tl.constexpr, scale2,  # V constexpr: the sweep's trip count and tail mask are known when compiling
    BLOCK_V: tl.constexpr,
):
    """dlogits = coef * (onehot - softmax) for one row; a row with coef 0 (masked, or no gradient) is only
    zero-filled. The split (loss kernel, then this one) lets each sweep run at its own best shape."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    coef = tl.load(coef_ptr + row)
    g_row = grad_ptr + b * stride_gb + t * stride_gt
    offs = tl.arange(0, BLOCK_V)
    if tl.load(flag_ptr) == 0:
        if coef != 0:
            lse2 = tl.load(lse_ptr + row)
            token = tl.load(ids_ptr + b * stride_ib + t * stride_it).to(tl.int32)  # int32: compared with int32 cols
            x_row = logits_ptr + b * stride_lb + t * stride_lt
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                x = tl.load(x_row + cols * STRIDE_LV, mask=cols < V, other=float("-inf")).to(tl.float32) * scale2
                p = tl.exp2(x - lse2)
                grad = tl.where(cols == token, coef - coef * p, -coef * p)
                tl.store(g_row + cols * STRIDE_GV, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)
        else:
            zeros = tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(g_row + cols * STRIDE_GV, zeros, mask=cols < V)


@triton.jit
def _scale_rows_kernel(grad_ptr, stride_gb, stride_gt, STRIDE_GV: tl.constexpr, scale_ptr, num_rows, T, V,
                       BLOCK_V: tl.constexpr):
    """grad [B, T, V] *= scale (a device scalar). When scale == 1, the usual upstream gradient of a loss, every
    program returns at once: backward rescales without a host sync to learn the value."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        offs = tl.arange(0, BLOCK_V)
        for program_row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
            row = tl.cast(program_row, tl.int64)
            g_row = grad_ptr + (row // T) * stride_gb + (row % T) * stride_gt
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                g = tl.load(g_row + cols * STRIDE_GV, mask=cols < V).to(tl.float32)
                tl.store(g_row + cols * STRIDE_GV, (g * scale).to(grad_ptr.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------- host side

def reduction_counts(counts, loss_type, batch, length, max_completion_length):
    """(count view [B, T] or None, factor) such that a token's weight is 1 / (max(count, 1) * factor): the
    kernel form of grm_engine.loss.token_weights, from the per-sequence counts [B]."""
    if loss_type == "grpo":
        return counts[:, None].expand(batch, length), float(batch)
    if loss_type == "bnpo":
        return counts.sum().expand(batch, length), 1.0
    return None, float(batch * (max_completion_length or length))


def launch_rows(logits, completion_ids, flag, *, mask=None, counts=None, weight_factor=1.0, advantages=None,
                rewards=None, group_size=None, old_logp=None, ref_logp=None, beta=0.0, eps_low=0.2, eps_high=0.2,
                temperature=1.0, grad=None, compute_loss=True, compute_entropy=False, block_v=None, num_warps=None,
                num_stages=None, programs=None, fused_grad=False, grad_block_v=8192, grad_num_warps=16,
                grad_num_stages=1):
    """Run the row kernel. logits/grad [B, T, V]; completion_ids, mask (None: every token counts), counts (None:
    weight 1 / factor), advantages (or None with rewards [B]), old_logp, ref_logp: [B, T] (any strides); flag
    from check_sequences. Returns a dict: logp and entropy [B, T] fp32, stats [B*T, NUM_STATS] fp32.

    With grad, the gradient is written by a second kernel (_grad_rows_kernel; its own block shape) unless
    fused_grad, where the loss kernel's program sweeps its row a second time (measured slower on an H200:
    bench/RESULTS.md). The defaults (loss kernel 2048 / 2 warps / 3 stages, gradient kernel 8192 / 16 warps)
    were the fastest of the shapes swept on an H200."""
    batch, length, vocab = logits.shape
    device = logits.device
    rows = batch * length
    out = {"logp": torch.empty(batch, length, device=device, dtype=torch.float32)}
    if compute_entropy:
        out["entropy"] = torch.empty(batch, length, device=device, dtype=torch.float32)
    if compute_loss:
        out["stats"] = torch.empty(rows, NUM_STATS, device=device, dtype=torch.float32)
    if rows == 0:
        return out
    dummy = out["logp"]
    has_rewards = compute_loss and rewards is not None
    has_ref = compute_loss and ref_logp is not None and beta != 0
    has_old = compute_loss and old_logp is not None
    has_count = compute_loss and counts is not None
    if compute_loss and not has_rewards:
        advantages = advantages if advantages.dim() == 2 else advantages[:, None].expand(batch, length)
    else:
        advantages = dummy
    grad_view = grad if grad is not None else logits
    if block_v is None:
        block_v = min(2048 if not fused_grad else 4096, triton.next_power_of_2(vocab))
    if num_warps is None:
        num_warps = 8 if fused_grad else 2
    if num_stages is None and not fused_grad:
        num_stages = 3
    group_size = group_size or 1
    lse = torch.empty(rows, device=device, dtype=torch.float32) if compute_loss else dummy
    coef = torch.empty(rows, device=device, dtype=torch.float32) if compute_loss else dummy
    _grpo_rows_kernel[(min(rows, programs or rows),)](
        logits, *logits.stride(),
        grad_view, *grad_view.stride(),
        completion_ids, *completion_ids.stride(),
        mask if mask is not None else dummy, *(mask.stride() if mask is not None else (0, 0)),
        counts if has_count else dummy, *(counts.stride() if has_count else (0, 0)),
        advantages, *advantages.stride(),
        rewards.float().contiguous() if has_rewards else dummy,
        old_logp if has_old else dummy, *(old_logp.stride() if has_old else (0, 0)),
        ref_logp if has_ref else dummy, *(ref_logp.stride() if has_ref else (0, 0)),
        flag, out["logp"], out.get("entropy", dummy), out.get("stats", dummy), lse, coef,
        rows, length, vocab, float(weight_factor), LOG2E / temperature, 1.0 / temperature, float(beta),
        float(eps_low), float(eps_high), 1e-4, LOG_RATIO_MAX,
        GROUP_SIZE=group_size, GROUP_BLOCK=triton.next_power_of_2(group_size), HAS_MASK=mask is not None,
        HAS_COUNT=has_count, HAS_REWARDS=has_rewards, HAS_OLD=has_old, HAS_REF=has_ref,
        COMPUTE_LOSS=compute_loss, WRITE_GRAD=grad is not None and compute_loss and fused_grad,
        COMPUTE_ENTROPY=compute_entropy, BLOCK_V=block_v, PERSISTENT=programs is not None and programs < rows,
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )
    if grad is not None and compute_loss and not fused_grad:
        _grad_rows_kernel[(rows,)](
            logits, *logits.stride(), grad_view, *grad_view.stride(), completion_ids, *completion_ids.stride(),
            lse, coef, flag, length, vocab, LOG2E / temperature,
            BLOCK_V=min(grad_block_v, triton.next_power_of_2(vocab)), num_warps=grad_num_warps,
            num_stages=grad_num_stages,
        )
    return out


def scale_rows(grad, scale):
    """grad [B, T, V] *= scale (0-dim tensor) on the device, skipped on the device when scale == 1."""
    batch, length, vocab = grad.shape
    rows = batch * length
    if rows:
        _scale_rows_kernel[(min(rows, SCALE_PROGRAMS),)](
            grad, *grad.stride(), scale, rows, length, vocab, BLOCK_V=min(4096, triton.next_power_of_2(vocab)),
            num_warps=8)


class _GRPOLossFunction(torch.autograd.Function):
    """Forward computes the loss and, when logits need a gradient, dlogits for an upstream gradient of 1;
    backward rescales on the device (no host sync; a no-op when the upstream gradient is 1)."""

    @staticmethod
    def forward(ctx, logits, completion_ids, mask, counts, weight_factor, flag, advantages, rewards, old_logp,
                ref_logp, options, inplace, needs_grad):
        grad = None
        if needs_grad:  # not ctx.needs_input_grad: that is True under torch.no_grad() too
            grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        out = launch_rows(logits, completion_ids, flag, mask=mask, counts=counts, weight_factor=weight_factor,
                          advantages=advantages, rewards=rewards, old_logp=old_logp, ref_logp=ref_logp, grad=grad,
                          **options)
        ctx.grad = grad
        stats = out["stats"]  # [B*T, 4]
        loss = stats[:, 0].sum()
        stat_sums = stats[:, 1:].sum(dim=0)  # [3]: kl sum, clipped tokens, completion tokens
        ctx.mark_non_differentiable(out["logp"], stat_sums)
        return loss, out["logp"], stat_sums

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad, ctx.grad = ctx.grad, None
        if grad is not None:
            scale_rows(grad, grad_loss)
        return grad, None, None, None, None, None, None, None, None, None, None, None, None


def grpo_loss_triton(logits, completion_ids, mask, *, advantages=None, rewards=None, group_size=None, old_logp=None,
                     ref_logp=None, beta=0.08, eps_low=0.2, eps_high=0.2, temperature=1.0, loss_type="grpo",
                     max_completion_length=None, inplace=True, **kernel_options):
    """Inputs other than the ids' range already checked by grm_engine.loss.grpo_loss. Returns (loss, GRPOStats).
    kernel_options: launch_rows' block shapes and variants (block_v, num_warps, num_stages, programs,
    fused_grad, grad_block_v, grad_num_warps, grad_num_stages), for tuning and tests."""
    batch, length, vocab = logits.shape
    finite_inputs = dict(advantages=advantages, rewards=rewards, old_logp=old_logp, ref_logp=ref_logp)
    # ids, counts and the NaN/Inf check of the per-token and per-sequence inputs in one prologue kernel, flag on the
    # device before the loss kernels read it (no host sync, a handful of host ops before the first kernel)
    counts, flag = check_sequences(completion_ids, mask, vocab, **finite_inputs)
    pending = FlagReader(flag)
    count_view, weight_factor = reduction_counts(counts, loss_type, batch, length, max_completion_length)
    options = dict(group_size=group_size, beta=beta, eps_low=eps_low, eps_high=eps_high, temperature=temperature,
                   **kernel_options)
    loss, logp, stat_sums = _GRPOLossFunction.apply(
        logits, completion_ids, mask, count_view, weight_factor, flag, advantages, rewards, old_logp, ref_logp,
        options, inplace, torch.is_grad_enabled() and logits.requires_grad)
    means = stat_sums[:2] / stat_sums[2].clamp(min=1.0)  # [2]: kl mean, clip fraction over completion tokens
    if pending.is_set():  # the kernels are queued: this waits for the prologue only
        check_finite_inputs(mask != 0, **finite_inputs)
        raise_bad_token_ids(completion_ids, mask, vocab)
    return loss, GRPOStats(kl=means[0], clip_frac=means[1], logp=logp)


def token_logprobs_triton(logits, completion_ids, *, mask=None, temperature=1.0, return_entropy=False,
                          block_v=None, num_warps=None, num_stages=None, programs=None):
    """Forward-only log_softmax(logits / T)[id] [B, T] fp32 (0 where masked), optionally the entropy."""
    _, flag = check_sequences(completion_ids, mask, logits.shape[-1])
    pending = FlagReader(flag)
    out = launch_rows(logits, completion_ids, flag, mask=mask, temperature=temperature, compute_loss=False,
                      compute_entropy=return_entropy, block_v=block_v, num_warps=num_warps,
                      num_stages=num_stages, programs=programs)
    if pending.is_set():
        raise_bad_token_ids(completion_ids, mask, logits.shape[-1])
    return (out["logp"], out["entropy"]) if return_entropy else out["logp"]
