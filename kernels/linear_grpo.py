"""Fused lm_head + GRPO loss: masked tokens are compacted away, then per chunk of C tokens logits [C, V] =
h @ W^T (cuBLAS), the row kernel of kernels/grpo_loss.py turns them into dlogits in place, and
grad_hidden = dlogits @ W, grad_weight += dlogits^T @ h (cuBLAS). Full [B*T, V] logits never exist.
Cost: three GEMMs of 2*N*V*H FLOPs over the N unmasked tokens plus ~3 passes over one [C, V] chunk buffer.
Reference: grm_engine.loss.fused_linear_grpo_loss_reference.
"""
from __future__ import annotations

import torch

from grm_engine.loss import GRPOStats, check_finite_inputs, group_advantages

from .grpo_loss import NUM_STATS, launch_rows
from .token_id_check import check_sequences, raise_bad_token_ids

# One chunk's logits. Each chunk also re-reads and re-writes the whole grad_weight (2 x 1.09 GB in bf16 at V=152k,
# H=3584), so fewer, larger chunks save that traffic: 1 GiB gives 5 chunks at 16,384 tokens (768 MiB gave 7:
# 85.7 ms on the H200) and ~2.3 GB extra in all (the budget is 2.5 GB).
CHUNK_BYTES_MAX = 1024**3


def auto_chunk_size(num_tokens: int, vocab: int, element_size: int, device: torch.device) -> int:
    """Tokens per chunk: the logits buffer takes at most 1/8 of free memory and CHUNK_BYTES_MAX."""
    budget = CHUNK_BYTES_MAX
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 8)
    chunk = budget // (vocab * element_size)
    chunk = max(128, chunk // 128 * 128)  # GEMM-friendly multiple of 128
    return max(1, min(chunk, num_tokens))


def _chunk_logits(h, weight, bias, out):
    """out [C, V] = h [C, H] @ weight[V, H]^T (+ bias), written into the preallocated chunk buffer."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _token_chunks(flat_hidden, token_index, weight, bias, chunk):
    """Per chunk of `chunk` unmasked tokens: (start, end, flat index [C], hidden rows h [C, H], logits [C, V]).
    One logits buffer serves every chunk: allocating per chunk kept two chunks alive at the peak."""
    num_tokens = token_index.numel()
    buffer = torch.empty(min(chunk, num_tokens), weight.shape[0], device=flat_hidden.device,
                         dtype=flat_hidden.dtype)  # [C, V]
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        index = token_index[start:end]
        h = flat_hidden.index_select(0, index)  # [C, H]
        yield start, end, index, h, _chunk_logits(h, weight, bias, buffer[: end - start])


def _softcap_(logits, softcap, tanh_out):
    """In place: logits [C, V] -> softcap * tanh(logits / softcap) (Gemma 2's final soft-capping; None: unchanged).
    tanh_out: a [C, V] buffer that keeps tanh(logits / softcap) for the gradient (returned), or None."""
    if softcap is None:
        return None
    if tanh_out is None:
        logits.div_(softcap).tanh_().mul_(softcap)
        return None
    torch.div(logits, softcap, out=tanh_out).tanh_()
    torch.mul(tanh_out, softcap, out=logits)
    return tanh_out


def _gather(tensor, index, batch, length):
    """[B] or [B, T] per-token quantity -> [N] at the flat token positions `index`."""
    if tensor is None:
        return None
    if tensor.dim() == 1:
        tensor = tensor[:, None].expand(batch, length)
    return tensor.reshape(-1).index_select(0, index).float()


class _FusedLinearGRPOFunction(torch.autograd.Function):
    """All three gradients are produced in the forward for an upstream gradient of 1; backward rescales."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, completion_ids, token_index, token_counts, weight_factor, flag, advantages,
                old_logp, ref_logp, options, chunk_size, needs, softcap):
        batch, length, hidden_size = hidden.shape
        vocab = weight.shape[0]
        need_hidden, need_weight, need_bias = needs  # not ctx.needs_input_grad: True under torch.no_grad() too
        any_grad = need_hidden or need_weight or need_bias
        num_tokens = token_index.numel()
        flat_hidden = hidden.reshape(-1, hidden_size)  # [B*T, H]
        ids = completion_ids.reshape(-1).index_select(0, token_index)  # [N]
        adv = _gather(advantages, token_index, batch, length)
        old = _gather(old_logp, token_index, batch, length)
        ref = _gather(ref_logp, token_index, batch, length)

        logp = torch.zeros(batch * length, device=hidden.device, dtype=torch.float32)  # [B*T]
        grad_hidden = torch.zeros_like(flat_hidden) if need_hidden else None  # masked rows stay 0
        # written by the first chunk's GEMM (no memset, no read of zeros); zeroed only if there is no chunk
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.zeros(vocab, device=hidden.device, dtype=torch.float32) if need_bias else None
        stat_parts = []
        # soft-capping keeps tanh(z / cap) of the chunk for the chain rule: two [C, V] buffers, half the tokens each
        chunk = chunk_size or auto_chunk_size(num_tokens, vocab, hidden.element_size() * (2 if softcap else 1),
                                              hidden.device)
        tanh_buffer = (torch.empty(min(chunk, num_tokens), vocab, device=hidden.device, dtype=hidden.dtype)
                       if softcap is not None and any_grad and num_tokens else None)
        for start, end, index, h, logits in _token_chunks(flat_hidden, token_index, weight, bias, chunk):
            rows = slice(start, end)
            tanh = _softcap_(logits, softcap, None if tanh_buffer is None else tanh_buffer[: end - start])
            out = launch_rows(
                logits[None], ids[None, rows], flag, counts=None if token_counts is None else token_counts[None, rows],
                weight_factor=weight_factor, advantages=adv[None, rows], old_logp=None if old is None else old[None, rows],
                ref_logp=None if ref is None else ref[None, rows], grad=logits[None] if any_grad else None, **options)
            logp.index_copy_(0, index, out["logp"][0])
            stat_parts.append(out["stats"].sum(dim=0))  # [4]: weighted loss, kl, clipped, tokens
            if tanh is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2: dlogits of the capped -> of the raw z
                logits.mul_(tanh.square_().neg_().add_(1.0))
            if need_hidden:
                grad_hidden.index_copy_(0, index, logits @ weight)  # [C, H]
            if need_weight:
                if start == 0:
                    torch.mm(logits.t(), h, out=grad_weight)  # [V, H] = [V, C] @ [C, H]
                else:
                    grad_weight.addmm_(logits.t(), h)  # [V, H] += [V, C] @ [C, H]
            if need_bias:
                grad_bias += logits.float().sum(0)
        if need_weight and num_tokens == 0:
            grad_weight.zero_()
        totals = (torch.stack(stat_parts).sum(dim=0) if stat_parts
                  else hidden.new_zeros(NUM_STATS, dtype=torch.float32))  # [4]
        loss, kl_sum, clip_sum = totals[0].clone(), totals[1].clone(), totals[2].clone()
        ctx.grads = (None if grad_hidden is None else grad_hidden.view_as(hidden), grad_weight,
                     None if grad_bias is None else grad_bias.to(bias.dtype))
        logp = logp.view(batch, length)
        ctx.mark_non_differentiable(logp, kl_sum, clip_sum)
        return loss, logp, kl_sum, clip_sum

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grads, ctx.grads = ctx.grads, None
        scale = bool(grad_loss != 1)
        # the scale stays fp32 (a 0-dim tensor does not promote): grad_loss rounded to bf16 first would scale
        # every gradient by up to 0.4% off (e.g. 1/540 or a micro-batch's share of the global count)
        grads = [g.mul_(grad_loss.float()) if (g is not None and scale) else g for g in grads]
        return (*grads, None, None, None, None, None, None, None, None, None, None, None, None)


def fused_linear_grpo_loss_triton(hidden, weight, completion_ids, mask, *, bias=None, chunk_size=None, advantages=None,
                                  rewards=None, group_size=None, old_logp=None, ref_logp=None, beta=0.08, eps_low=0.2,
                                  eps_high=0.2, temperature=1.0, loss_type="grpo", max_completion_length=None,
                                  block_v=None, num_warps=None, programs=None, softcap=None):
    """Inputs other than the ids' range already checked by grm_engine.loss.fused_linear_grpo_loss.
    Returns (loss, GRPOStats)."""
    batch, length, _ = hidden.shape
    valid = mask != 0
    finite_inputs = dict(advantages=advantages, rewards=rewards, old_logp=old_logp, ref_logp=ref_logp)
    counts, flag = check_sequences(completion_ids, mask, weight.shape[0], **finite_inputs)  # [B] tokens; flag bits
    token_index = valid.reshape(-1).nonzero().squeeze(1)  # [N] unmasked flat positions (a sync, before any GEMM)
    if flag.item():
        check_finite_inputs(valid, **finite_inputs)
        raise_bad_token_ids(completion_ids, mask, weight.shape[0])
    if loss_type == "grpo":  # the token weight 1 / (max(count, 1) * factor), as grm_engine.loss.token_weights
        token_counts, weight_factor = counts.index_select(0, token_index // length), float(batch)  # [N]
    elif loss_type == "bnpo":
        token_counts, weight_factor = counts.sum().expand(token_index.numel()), 1.0
    else:
        token_counts, weight_factor = None, float(batch * (max_completion_length or length))
    if advantages is None:
        advantages = group_advantages(rewards, group_size)
    options = dict(beta=beta, eps_low=eps_low, eps_high=eps_high, temperature=temperature,
                   block_v=block_v, num_warps=num_warps, programs=programs)
    grad_enabled = torch.is_grad_enabled()
    needs = tuple(grad_enabled and t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, logp, kl_sum, clip_sum = _FusedLinearGRPOFunction.apply(
        hidden, weight, bias, completion_ids, token_index, token_counts, weight_factor, flag, advantages, old_logp,
        ref_logp, options, chunk_size, needs, softcap)
    count = max(token_index.numel(), 1)
    return loss, GRPOStats(kl=kl_sum / count, clip_frac=clip_sum / count, logp=logp)


@torch.no_grad()
def fused_linear_token_logprobs_triton(hidden, weight, completion_ids, *, bias=None, mask=None, temperature=1.0,
                                       return_entropy=False, chunk_size=None, block_v=None, num_warps=None,
                                       softcap=None):
    """Forward-only log_softmax((h @ W^T + bias) / T)[id] [B, T] fp32 (0 where masked), optionally the entropy;
    chunked like the loss, so old/ref log-probs of a fused-lm_head run never build the full logits either."""
    batch, length, hidden_size = hidden.shape
    vocab = weight.shape[0]
    valid = torch.ones(batch * length, device=hidden.device, dtype=torch.bool) if mask is None else (mask != 0).reshape(-1)
    _, flag = check_sequences(completion_ids, mask, vocab)
    token_index = valid.nonzero().squeeze(1)  # [N] (a sync, before any GEMM)
    if flag.item():
        raise_bad_token_ids(completion_ids, mask, vocab)
    num_tokens = token_index.numel()
    ids = completion_ids.reshape(-1).index_select(0, token_index)  # [N]
    logp = torch.zeros(batch * length, device=hidden.device, dtype=torch.float32)
    entropy = torch.zeros_like(logp) if return_entropy else None
    flat_hidden = hidden.reshape(-1, hidden_size)
    chunk = chunk_size or auto_chunk_size(num_tokens, vocab, hidden.element_size(), hidden.device)
    for start, end, index, _, logits in _token_chunks(flat_hidden, token_index, weight, bias, chunk):
        _softcap_(logits, softcap, None)
        out = launch_rows(logits[None], ids[None, start:end], flag, temperature=temperature,
                          compute_loss=False, compute_entropy=return_entropy, block_v=block_v, num_warps=num_warps)
        logp.index_copy_(0, index, out["logp"][0])
        if return_entropy:
            entropy.index_copy_(0, index, out["entropy"][0])
    logp = logp.view(batch, length)
    return (logp, entropy.view(batch, length)) if return_entropy else logp
