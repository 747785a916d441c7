"""The gradient side of the fused GRPO loss (kernels/grpo_loss.py): dlogits = c * (onehot - softmax) per row from
the loss kernel's saved base-2 LSE and coefficient (one read and one write of each unmasked row, a zero-fill of a
masked one), and the device-side rescale by the upstream gradient in backward. Reference:
grm_engine.loss.grpo_loss_reference's autograd gradient.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .token_id_check import next_power_of_2

LOG2E = 1.4426950408889634  # host side: folded into the scale argument
NUM_STATS = 4  # per-row stats: weighted loss, kl, clipped, completion token
STATS_WIDTH = tl.constexpr(NUM_STATS)  # the same, for kernels (a jit function reads constexpr globals only)
SCALE_PROGRAMS = 2048  # _scale_rows_kernel's grid: returns at once when the upstream gradient is 1
# The loss kernel's output (written by kernels/grpo_loss.py, read here): one fp32 buffer of planes of B*T values (one
# allocation, one pointer): logp; with the loss: base-2 LSE, coef (d loss / d logit scale), stats [B*T, NUM_STATS];
# then the entropy if asked.
LSE_PLANE, COEF_PLANE, STATS_PLANE = 1, 2, 3
LOSS_PLANES = STATS_PLANE + NUM_STATS
LSE_AT, COEF_AT, STATS_AT = tl.constexpr(LSE_PLANE), tl.constexpr(COEF_PLANE), tl.constexpr(STATS_PLANE)


@triton.jit
def _grad_rows_kernel(
    logits_ptr, stride_lb, stride_lt, STRIDE_LV: tl.constexpr,  # [B, T, V]
    grad_ptr, stride_gb, stride_gt, STRIDE_GV: tl.constexpr,  # [B, T, V] (may alias logits)
    ids_ptr, stride_ib, stride_it,  # [B, T]
    out_ptr,  # the loss kernel's fp32 planes (lse, coef, stats)
    flag_ptr,  # int32: nonzero when a completion id or input is bad: nothing is written
    count_ptr, stride_cb, stride_ct,  # WEIGHT_LATER and HAS_COUNT: [B, T] view of the count in the token's weight
    num_rows, T, V: tl.constexpr, scale2, weight_factor, inv_temp,  # V constexpr: the sweep's trip count is known
    WEIGHT_LATER: tl.constexpr, HAS_COUNT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dlogits = coef * (onehot - softmax) for one row; a row with coef 0 (masked, or no gradient) is only
    zero-filled. The split (loss kernel, then this one) lets each sweep run at its own best shape.
    WEIGHT_LATER: the loss kernel stored the unweighted loss and d loss / d logp; the reduction weight
    1 / (max(count, 1) * factor) (the counts come from the check kernel queued in between) is applied here, with the
    loss kernel's own arithmetic, and the weighted loss written back into the stats."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    rows = tl.cast(num_rows, tl.int64)
    coef = tl.load(out_ptr + COEF_AT * rows + row)
    if WEIGHT_LATER:
        w = tl.math.div_rn(1.0, weight_factor)
        if HAS_COUNT:
            count = tl.load(count_ptr + b * stride_cb + t * stride_ct).to(tl.float32)
            w = tl.math.div_rn(1.0, tl.maximum(count, 1.0) * weight_factor)
        stats_row = out_ptr + STATS_AT * rows + row * STATS_WIDTH
        tl.store(stats_row, w * tl.load(stats_row))
        coef = w * coef * inv_temp
    g_row = grad_ptr + b * stride_gb + t * stride_gt
    offs = tl.arange(0, BLOCK_V)
    if tl.load(flag_ptr) == 0:
        if coef != 0:
            lse2 = tl.load(out_ptr + LSE_AT * rows + row)
            token = tl.load(ids_ptr + b * stride_ib + t * stride_it).to(tl.int64)
            token = tl.minimum(tl.maximum(token, 0), V - 1).to(tl.int32)  # int32: compared with int32 cols
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

def queue_grad_rows(logits, grad, completion_ids, out, flag, *, counts=None, weight_factor=1.0, temperature=1.0,
                    weight_later=False, grad_block_v=8192, grad_num_warps=16, grad_num_stages=1):
    """Launch _grad_rows_kernel: grad [B, T, V] from the loss kernel's planes `out` (weighted here when
    weight_later, with counts / weight_factor as in launch_rows)."""
    batch, length, vocab = logits.shape
    rows = batch * length
    if rows == 0:
        return
    has_count = weight_later and counts is not None
    _grad_rows_kernel[(rows,)](
        logits, *logits.stride(), grad, *grad.stride(), completion_ids, *completion_ids.stride(), out, flag,
        counts if has_count else out, *(counts.stride() if has_count else (0, 0)), rows, length, vocab,
        LOG2E / temperature, float(weight_factor), 1.0 / temperature, WEIGHT_LATER=weight_later, HAS_COUNT=has_count,
        BLOCK_V=min(grad_block_v, next_power_of_2(vocab)), num_warps=grad_num_warps, num_stages=grad_num_stages,
    )


def scale_rows(grad, scale):
    """grad [B, T, V] *= scale (0-dim tensor) on the device, skipped on the device when scale == 1."""
    batch, length, vocab = grad.shape
    rows = batch * length
    if rows:
        _scale_rows_kernel[(min(rows, SCALE_PROGRAMS),)](
            grad, *grad.stride(), scale, rows, length, vocab,
            BLOCK_V=min(4096, next_power_of_2(vocab)), num_warps=8)
