"""Fused GRPO loss over logits [B, T, V]: one program per (b, t) row computes log_softmax(x / T)[id] by an online
fp32 log-sum-exp and TRL's per-token loss; a second kernel writes dlogits = c * (onehot - softmax), in place into
the logits by default. Traffic: an unmasked row is read, then read and written; a masked row is only zero-filled;
a per-sequence prologue reads the ids and the mask once. Reference: grm_engine.loss.grpo_loss_reference.

No host sync and no other kernel stands before the loss kernel: with a gradient to write, the loss kernel runs
first with unweighted per-row results, the per-sequence check (token_id_check.py: counts, the id range, NaN/Inf in
the inputs, one flag) runs behind it, the flag is copied to pinned memory, and the gradient kernel applies the
reduction weight from the counts and writes nothing when the flag is set, so a failed call leaves the logits as
they were. The host waits for the flag once everything is queued. Every gather index is clamped into [0, V), so a
bad id never reads out of bounds. Without a gradient (or with fused_grad) the check runs first, as the weights and
the in-kernel gradient need it. Host work per call is kept small (bench/loss_host.py counts it): one output buffer,
few arguments, no torch op before the loss kernel's launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from grm_engine.loss import LOG_RATIO_MAX, GRPOStats, check_finite_inputs

from .grpo_grad import (COEF_AT, LOG2E, LOSS_PLANES, LSE_AT, NUM_STATS, STATS_AT, STATS_PLANE, STATS_WIDTH,
                        queue_grad_rows, scale_rows)
from .token_id_check import (COUNTS_OFFSET, FlagReader, check_sequences, new_flag_buffer, next_power_of_2,
                             queue_check, raise_bad_token_ids)

LN2 = tl.constexpr(0.6931471805599453)  # used inside kernels: Triton needs constexpr globals
REWARD_EPS = tl.constexpr(1e-4)  # group_advantages' eps
LOG_RATIO_CAP = tl.constexpr(LOG_RATIO_MAX)
GRAD_OPTIONS = ("grad_block_v", "grad_num_warps", "grad_num_stages")  # queue_grad_rows' keyword arguments


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
    flag_ptr,  # int32, nonzero when a completion id or input is bad: the gradient is then not written (WRITE_GRAD)
    out_ptr,  # fp32 planes of B*T (LSE_PLANE...): logp, lse, coef, stats [weight * loss, kl, clipped, 1], entropy
    num_rows, T, V, weight_factor, scale2, inv_temp, beta, eps_low, eps_high,
    GROUP_SIZE: tl.constexpr, GROUP_BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COUNT: tl.constexpr,
    HAS_REWARDS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
    WEIGHT_LATER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.cast(program_row, tl.int64)  # int64: B*T*V exceeds 2**31 at real sizes
    b = row // T
    t = row % T
    rows = tl.cast(num_rows, tl.int64)
    logp_out = out_ptr
    lse_out = out_ptr + LSE_AT * rows
    coef_out = out_ptr + COEF_AT * rows
    stats_out = out_ptr + STATS_AT * rows  # [B*T, STATS_WIDTH]
    if COMPUTE_LOSS:
        entropy_out = out_ptr + (STATS_AT + STATS_WIDTH) * rows
    else:
        entropy_out = out_ptr + rows
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
                adv = (tl.load(rewards_ptr + b) - mean) / (tl.sqrt(var) + REWARD_EPS)
            else:
                adv = tl.load(adv_ptr + b * stride_ab + t * stride_at).to(tl.float32)
            if HAS_OLD:
                log_ratio = logp - tl.load(old_ptr + b * stride_ob + t * stride_ot).to(tl.float32)
                ratio = tl.exp(tl.minimum(log_ratio, LOG_RATIO_CAP))
                dratio = tl.where(log_ratio <= LOG_RATIO_CAP, ratio, 0.0)  # clamp passes no gradient beyond
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
                gap = tl.minimum(ref_gap, LOG_RATIO_CAP)
                exp_gap = tl.exp(gap)
                kl = exp_gap - gap - 1
                loss_tok += beta * kl
                dloss += beta * tl.where(ref_gap <= LOG_RATIO_CAP, 1 - exp_gap, 0.0)
            stats_row = stats_out + row * STATS_WIDTH
            if WEIGHT_LATER:  # the weight needs the counts: _grad_rows_kernel applies it (the same arithmetic)
                tl.store(stats_row, loss_tok)
                coef = dloss
            else:
                tl.store(stats_row, w * loss_tok)
                coef = w * dloss * inv_temp  # d loss / d logit_v = coef * (onehot_v - softmax_v)
            tl.store(stats_row + 1, kl)
            tl.store(stats_row + 2, is_clipped.to(tl.float32))
            tl.store(stats_row + 3, 1.0)
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
    stride_rt, flag_ptr, out_ptr, num_rows, T, V, weight_factor, scale2, inv_temp, beta, eps_low, eps_high,
    GROUP_SIZE: tl.constexpr, GROUP_BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COUNT: tl.constexpr,
    HAS_REWARDS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
    WEIGHT_LATER: tl.constexpr, BLOCK_V: tl.constexpr, PERSISTENT: tl.constexpr,
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
                stride_rt, flag_ptr, out_ptr, num_rows, T, V, weight_factor, scale2, inv_temp, beta, eps_low,
                eps_high, GROUP_SIZE, GROUP_BLOCK, HAS_MASK, HAS_COUNT, HAS_REWARDS, HAS_OLD, HAS_REF, COMPUTE_LOSS,
                WRITE_GRAD, COMPUTE_ENTROPY, WEIGHT_LATER, BLOCK_V
            )
    else:  # one row per program: no outer loop, so the sweeps over the row pipeline their loads
        _grpo_row(
            tl.program_id(0), logits_ptr, stride_lb, stride_lt, STRIDE_LV, grad_ptr, stride_gb, stride_gt, STRIDE_GV,
            ids_ptr, stride_ib, stride_it, mask_ptr, stride_mb, stride_mt, count_ptr, stride_cb, stride_ct, adv_ptr,
            stride_ab, stride_at, rewards_ptr, old_ptr, stride_ob, stride_ot, ref_ptr, stride_rb, stride_rt,
            flag_ptr, out_ptr, num_rows, T, V, weight_factor, scale2, inv_temp, beta, eps_low, eps_high, GROUP_SIZE,
            GROUP_BLOCK, HAS_MASK, HAS_COUNT, HAS_REWARDS, HAS_OLD, HAS_REF, COMPUTE_LOSS, WRITE_GRAD,
            COMPUTE_ENTROPY, WEIGHT_LATER, BLOCK_V
        )


# ----------------------------------------------------------------------------- host side

def reduction_counts(ints, loss_type, batch, length, max_completion_length):
    """(count view [B, T] or None, factor) such that a token's weight is 1 / (max(count, 1) * factor): the
    kernel form of grm_engine.loss.token_weights, from the check kernel's buffer (token_id_check.new_flag_buffer)."""
    if loss_type == "grpo":
        return ints[COUNTS_OFFSET:, None].expand(batch, length), float(batch)
    if loss_type == "bnpo":
        return ints[1:2].expand(batch, length), 1.0  # the batch total
    return None, float(batch * (max_completion_length or length))


def queue_loss_rows(logits, completion_ids, flag, *, mask=None, counts=None, weight_factor=1.0, advantages=None,
                    rewards=None, group_size=None, old_logp=None, ref_logp=None, beta=0.0, eps_low=0.2,
                    eps_high=0.2, temperature=1.0, grad=None, compute_loss=True, compute_entropy=False,
                    weight_later=False, block_v=None, num_warps=None, num_stages=None, programs=None,
                    fused_grad=False):
    """Launch the loss kernel; returns its output planes (unpack_rows names them). Nothing but one allocation
    precedes the launch: this is the first kernel of a grpo_loss call. Arguments as in launch_rows; flag may be
    None unless the gradient is written here (fused_grad)."""
    batch, length, vocab = logits.shape
    rows = batch * length
    planes = 1 + (LOSS_PLANES if compute_loss else 0) + (1 if compute_entropy else 0)
    out = torch.empty(planes * rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return out
    write_grad = compute_loss and fused_grad and grad is not None
    has_ref = compute_loss and ref_logp is not None and beta != 0
    has_old = compute_loss and old_logp is not None
    has_count = compute_loss and counts is not None
    has_rewards = compute_loss and rewards is not None
    if has_rewards and (rewards.dtype != torch.float32 or not rewards.is_contiguous()):
        rewards = rewards.float().contiguous()
    if not compute_loss or has_rewards:
        advantages = None
    grad_view = grad if write_grad else logits
    if block_v is None:
        block_v = min(4096 if fused_grad else 2048, next_power_of_2(vocab))
    if num_stages is None and not fused_grad:
        num_stages = 3
    group_size = group_size or 1
    _grpo_rows_kernel[(min(rows, programs or rows),)](
        logits, *logits.stride(), grad_view, *grad_view.stride(), completion_ids, *completion_ids.stride(),
        out if mask is None else mask, *((0, 0) if mask is None else mask.stride()),
        counts if has_count else out, *(counts.stride() if has_count else (0, 0)),
        # [B] advantages get a zero time stride (no expand op before the launch)
        out if advantages is None else advantages, *((0, 0) if advantages is None else (*advantages.stride(), 0)[:2]),
        rewards if has_rewards else out,
        old_logp if has_old else out, *(old_logp.stride() if has_old else (0, 0)),
        ref_logp if has_ref else out, *(ref_logp.stride() if has_ref else (0, 0)),
        flag if write_grad else out, out, rows, length, vocab, float(weight_factor), LOG2E / temperature,
        1.0 / temperature, float(beta), float(eps_low), float(eps_high),
        GROUP_SIZE=group_size, GROUP_BLOCK=next_power_of_2(group_size), HAS_MASK=mask is not None,
        HAS_COUNT=has_count, HAS_REWARDS=has_rewards, HAS_OLD=has_old, HAS_REF=has_ref, COMPUTE_LOSS=compute_loss,
        WRITE_GRAD=write_grad, COMPUTE_ENTROPY=compute_entropy, WEIGHT_LATER=weight_later, BLOCK_V=block_v,
        PERSISTENT=programs is not None and programs < rows, num_warps=num_warps or (8 if fused_grad else 2),
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
    return out


def unpack_rows(out, batch, length, compute_loss=True, compute_entropy=False):
    """The loss kernel's planes as a dict: logp and entropy [B, T] fp32, stats [B*T, NUM_STATS] fp32."""
    rows = batch * length
    result = {"logp": out[:rows].view(batch, length)}
    if compute_loss:
        result["stats"] = out[STATS_PLANE * rows: LOSS_PLANES * rows].view(rows, NUM_STATS)
    if compute_entropy:
        start = (LOSS_PLANES if compute_loss else 1) * rows
        result["entropy"] = out[start: start + rows].view(batch, length)
    return result


def launch_rows(logits, completion_ids, flag, *, mask=None, counts=None, weight_factor=1.0, advantages=None,
                rewards=None, group_size=None, old_logp=None, ref_logp=None, beta=0.0, eps_low=0.2, eps_high=0.2,
                temperature=1.0, grad=None, compute_loss=True, compute_entropy=False, block_v=None, num_warps=None,
                num_stages=None, programs=None, fused_grad=False, grad_block_v=8192, grad_num_warps=16,
                grad_num_stages=1):
    """Run the row kernels with the flag already computed (check_sequences first). logits/grad [B, T, V];
    completion_ids, mask (None: every token counts), counts (None: weight 1 / factor), advantages (or None with
    rewards [B]), old_logp, ref_logp: [B, T] (any strides; advantages may be [B]). Returns a dict: logp and entropy
    [B, T] fp32, stats [B*T, NUM_STATS] fp32.

    With grad, the gradient is written by a second kernel (_grad_rows_kernel; its own block shape) unless
    fused_grad, where the loss kernel's program sweeps its row a second time (measured slower on an H200:
    bench/RESULTS.md). The defaults (loss kernel 2048 / 2 warps / 3 stages, gradient kernel 8192 / 16 warps)
    were the fastest of the shapes swept on an H200."""
    out = queue_loss_rows(logits, completion_ids, flag, mask=mask, counts=counts, weight_factor=weight_factor,
                          advantages=advantages, rewards=rewards, group_size=group_size, old_logp=old_logp,
                          ref_logp=ref_logp, beta=beta, eps_low=eps_low, eps_high=eps_high, temperature=temperature,
                          grad=grad, compute_loss=compute_loss, compute_entropy=compute_entropy, block_v=block_v,
                          num_warps=num_warps, num_stages=num_stages, programs=programs, fused_grad=fused_grad)
    if grad is not None and compute_loss and not fused_grad:
        queue_grad_rows(logits, grad, completion_ids, out, flag, temperature=temperature, grad_block_v=grad_block_v,
                        grad_num_warps=grad_num_warps, grad_num_stages=grad_num_stages)
    return unpack_rows(out, *logits.shape[:2], compute_loss, compute_entropy)


class _GRPOLossFunction(torch.autograd.Function):
    """Connects the loss to the logits. The kernels ran before apply (its host cost is not in front of them) and
    wrote dlogits for an upstream gradient of 1; backward rescales on the device (no host sync; a no-op when the
    upstream gradient is 1)."""

    @staticmethod
    def forward(ctx, logits, loss, grad):
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None
        scale_rows(grad, grad_loss)
        return grad, None, None


def grpo_loss_triton(logits, completion_ids, mask, *, advantages=None, rewards=None, group_size=None, old_logp=None,
                     ref_logp=None, beta=0.08, eps_low=0.2, eps_high=0.2, temperature=1.0, loss_type="grpo",
                     max_completion_length=None, inplace=True, **kernel_options):
    """Inputs other than the ids' range already checked by grm_engine.loss.grpo_loss. Returns (loss, GRPOStats).
    kernel_options: launch_rows' block shapes and variants (block_v, num_warps, num_stages, programs,
    fused_grad, grad_block_v, grad_num_warps, grad_num_stages), for tuning and tests.

    With a gradient to write (and not fused_grad), the loss kernel is the first thing launched; the check kernel
    (counts, flag) and the gradient kernel (which applies the weights) follow. Otherwise the check runs first."""
    batch, length, vocab = logits.shape
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    weight_later = needs_grad and not kernel_options.get("fused_grad")
    grad_options = {k: kernel_options.pop(k) for k in GRAD_OPTIONS if k in kernel_options} if kernel_options else {}
    if weight_later:  # first, with nothing but the output allocation before it
        out = queue_loss_rows(logits, completion_ids, None, mask=mask, advantages=advantages, rewards=rewards,
                              group_size=group_size, old_logp=old_logp, ref_logp=ref_logp, beta=beta, eps_low=eps_low,
                              eps_high=eps_high, temperature=temperature, weight_later=True, **kernel_options)
    finite_inputs = dict(advantages=advantages, rewards=rewards, old_logp=old_logp, ref_logp=ref_logp)
    ints = new_flag_buffer(batch, logits.device)  # flag, batch total, counts
    queue_check(ints, completion_ids, mask, vocab, **finite_inputs)
    pending = FlagReader(ints[:1])
    count_view, weight_factor = reduction_counts(ints, loss_type, batch, length, max_completion_length)
    grad = None
    if needs_grad:
        grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if weight_later:
        queue_grad_rows(logits, grad, completion_ids, out, ints, counts=count_view, weight_factor=weight_factor,
                        temperature=temperature, weight_later=True, **grad_options)
    else:  # the check first: the loss kernel weights its rows itself (and writes the gradient when fused)
        out = queue_loss_rows(logits, completion_ids, ints, mask=mask, counts=count_view, weight_factor=weight_factor,
                              advantages=advantages, rewards=rewards, group_size=group_size, old_logp=old_logp,
                              ref_logp=ref_logp, beta=beta, eps_low=eps_low, eps_high=eps_high,
                              temperature=temperature, grad=grad, **kernel_options)
    rows = batch * length
    stats = out[STATS_PLANE * rows: LOSS_PLANES * rows].view(rows, NUM_STATS)
    totals = stats.sum(dim=0)  # [4]: loss, kl sum, clipped tokens, completion tokens
    means = totals[1:3] / totals[3].clamp(min=1.0)  # [2]: kl mean, clip fraction over completion tokens
    loss = _GRPOLossFunction.apply(logits, totals[0], grad) if needs_grad else totals[0]
    if pending.is_set():  # the kernels are queued: this waits for the loss and check kernels only
        check_finite_inputs(mask != 0, **finite_inputs)
        raise_bad_token_ids(completion_ids, mask, vocab)
    return loss, GRPOStats(kl=means[0], clip_frac=means[1], logp=out[:rows].view(batch, length))


def token_logprobs_triton(logits, completion_ids, *, mask=None, temperature=1.0, return_entropy=False,
                          block_v=None, num_warps=None, num_stages=None, programs=None):
    """Forward-only log_softmax(logits / T)[id] [B, T] fp32 (0 where masked), optionally the entropy. The check
    first: the host then waits for it alone and may queue more work while the log-prob kernel runs."""
    batch, length, vocab = logits.shape
    _, flag = check_sequences(completion_ids, mask, vocab)
    pending = FlagReader(flag)
    out = queue_loss_rows(logits, completion_ids, None, mask=mask, temperature=temperature, compute_loss=False,
                          compute_entropy=return_entropy, block_v=block_v, num_warps=num_warps,
                          num_stages=num_stages, programs=programs)
    if pending.is_set():
        raise_bad_token_ids(completion_ids, mask, vocab)
    result = unpack_rows(out, batch, length, compute_loss=False, compute_entropy=return_entropy)
    return (result["logp"], result["entropy"]) if return_entropy else result["logp"]
