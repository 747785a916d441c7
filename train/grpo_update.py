"""The policy-update half of a GRPO step (train/grpo.py runs the loop): rollout rows -> left-padded micro-batches
sized by a token budget -> reference / old log-probs and the loss through the fused lm_head kernels -> backward with
each micro-batch's share of the global counts (all micro-batches, all ranks), so the gradient equals the one-batch
loss's whatever the accumulation or world size. The specification is tests/test_train_grpo.py's per-row restatement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..loss import fused_linear_grpo_loss, fused_linear_token_logprobs, group_advantages
from .engine import all_reduce_sum, rank, world_size
from .losses import call_through_module, final_logit_softcap


def micro_batches(prompts: list[list[int]], lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices per micro-batch: consecutive rows while rows x (longest prompt + longest completion) fits."""
    batches, current, width_p, width_c = [], [], 0, 0
    for i, (prompt, length) in enumerate(zip(prompts, lengths)):
        p, c = max(width_p, len(prompt)), max(width_c, length)
        if current and (len(current) + 1) * (p + c) > budget:
            batches.append(current)
            current, p, c = [], len(prompt), length
        current.append(i)
        width_p, width_c = p, c
    if current:
        batches.append(current)
    return batches


def pack_rows(prompts, completion_ids: torch.Tensor, lengths: list[int], rows: list[int], device, pad_id: int):
    """Left-padded prompts + right-padded completions: every completion starts at column P.
    -> input_ids [B, P + C], attention_mask [B, P + C], position_ids, ids [B, C], mask [B, C], P."""
    P = max(len(prompts[i]) for i in rows)
    C = max(max(lengths[i] for i in rows), 1)
    B = len(rows)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + C), dtype=torch.long)
    ids = completion_ids[rows, :C].cpu()  # [B, C]
    mask = torch.zeros((B, C), dtype=torch.bool)
    for b, i in enumerate(rows):
        prompt = prompts[i]
        input_ids[b, P - len(prompt):P] = torch.tensor(prompt)
        input_ids[b, P:P + lengths[i]] = ids[b, :lengths[i]]
        attention[b, P - len(prompt):P + lengths[i]] = 1
        mask[b, :lengths[i]] = True
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return move(input_ids), move(attention), move(position_ids), move(ids), move(mask), P


def completion_hidden(model, input_ids, attention_mask, position_ids, P: int, C: int) -> torch.Tensor:
    body = model.get_decoder()
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return hidden[:, P - 1:P - 1 + C]  # [B, C, H]: position P-1+t predicts completion token t


@torch.no_grad()
def sequence_logprobs(model, batch, temperature: float) -> torch.Tensor:
    input_ids, attention, position_ids, ids, mask, P = batch
    hidden = completion_hidden(model, input_ids, attention, position_ids, P, ids.shape[1])
    head = model.get_output_embeddings()

    def run(head, hidden, ids, mask):
        weight = head.weight if head.weight.dtype == hidden.dtype else head.weight.to(hidden.dtype)
        return fused_linear_token_logprobs(hidden, weight, ids, mask=mask, temperature=temperature,
                                           softcap=final_logit_softcap(model))

    return call_through_module(head, run, hidden, ids, mask)  # [B, C] fp32


def policy_loss(model, batch, advantages, old_logp, ref_logp, config):
    input_ids, attention, position_ids, ids, mask, P = batch
    hidden = completion_hidden(model, input_ids, attention, position_ids, P, ids.shape[1])
    head = model.get_output_embeddings()

    def run(head, hidden, ids, mask):
        weight = head.weight if head.weight.dtype == hidden.dtype else head.weight.to(hidden.dtype)
        loss, stats = fused_linear_grpo_loss(
            hidden, weight, ids, mask, advantages=advantages, old_logp=old_logp, ref_logp=ref_logp,
            beta=config.beta, eps_low=config.epsilon, eps_high=config.epsilon_high, temperature=config.temperature,
            loss_type=config.loss_type, max_completion_length=config.max_completion_length,
            softcap=final_logit_softcap(model))
        return loss, stats.kl, stats.clip_frac

    return call_through_module(head, run, hidden, ids, mask)


def _clock(device) -> float:
    if device.type == "cuda":  # the breakdown times GPU work, not kernel launches
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Chunk:
    """One rollout chunk's training material (fixed before any update of the step)."""
    rollouts: object  # train.rollout.Rollouts (prompt_ids, completion_ids, completion_mask, rewards, ...)
    advantages: torch.Tensor  # [N] fp32
    rows: list[int]  # rows that train (all, or those of groups with a nonzero advantage)
    lengths: list[int]  # [N] completion lengths
    zero_groups: torch.Tensor  # [N / G] bool: the group's G rewards are all equal


def make_chunk(rollouts, config) -> Chunk:
    G = config.num_generations
    advantages = group_advantages(rollouts.rewards.float(), G, scale=config.scale_rewards)  # [N]
    grouped = rollouts.rewards.reshape(-1, G)
    zero_groups = (grouped == grouped[:, :1]).all(dim=1)  # [N / G]
    keep = ~zero_groups.repeat_interleave(G) if config.skip_zero_advantage else torch.ones_like(advantages, dtype=torch.bool)
    rows = [i for i, k in enumerate(keep.tolist()) if k]
    return Chunk(rollouts, advantages, rows, rollouts.completion_mask.sum(1).tolist(), zero_groups)


def accumulate_gradients(engine, reference, chunks: list[Chunk], config, device, pad_id, timings: dict,
                         old_logps: dict | None = None) -> dict:
    """The policy update's forward/backward over every chunk's rows, micro-batch by micro-batch; each micro-batch's
    loss is scaled by its share of the global counts. Every rank runs the same number of micro-batches (an empty
    one is a zero-weighted forward on one row) so ZeRO-3's collectives line up. -> summed loss / kl / clip stats.
    old_logps: None (num_iterations = 1: ratio 1), or a dict filled on the first iteration with the policy's
    log-probs before any update (micro-batch number -> [B, C]) and read on the later ones."""
    plans = [micro_batches([c.rollouts.prompt_ids[i] for i in c.rows], [c.lengths[i] for i in c.rows],
                           config.max_tokens_per_micro_batch) for c in chunks]
    local_rows = sum(len(c.rows) for c in chunks)
    local_tokens = sum(sum(c.lengths[i] for i in c.rows) for c in chunks)
    local_micro = sum(len(p) for p in plans)
    global_rows, global_tokens, max_micro = _reduce_counts(local_rows, local_tokens, local_micro, device)
    max_micro = max(max_micro, 1)  # the optimizer steps even when every group was skipped
    work = [(c, [c.rows[j] for j in micro]) for c, plan in zip(chunks, plans) for micro in plan]
    while len(work) < max_micro:  # a padding micro-batch: one real row, weight 0
        work.append((chunks[0], [0]))
    sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "tokens": 0.0, "rows": global_rows, "global_tokens": global_tokens}
    for m, (chunk, rows) in enumerate(work):
        batch = pack_rows(chunk.rollouts.prompt_ids, chunk.rollouts.completion_ids, chunk.lengths, rows, device, pad_id)
        t0 = _clock(device)
        ref_logp = None
        if reference is not None:
            with engine.autocast():
                ref_logp = sequence_logprobs(reference, batch, config.temperature)
        timings["reference_s"] += _clock(device) - t0
        t0 = _clock(device)
        old_logp = None  # num_iterations = 1: ratio 1 with the gradient of exp(logp - logp.detach())
        if old_logps is not None:
            if m not in old_logps:
                with engine.autocast():
                    old_logps[m] = sequence_logprobs(engine.module, batch, config.temperature)
            old_logp = old_logps[m]
        with engine.autocast():
            loss, kl, clip = policy_loss(engine.module, batch, chunk.advantages[rows].to(device), old_logp, ref_logp,
                                         config)
        tokens_m = int(batch[4].sum())
        if m >= local_micro:
            share = 0.0
        elif config.loss_type == "bnpo":  # masked sum / masked count, over the global batch
            share = tokens_m / max(global_tokens, 1)
        else:  # grpo: mean over sequences; dr_grpo: sum / (sequences x max_completion_length)
            share = len(rows) / max(global_rows, 1)
        engine.backward(loss * share, last=m == len(work) - 1, name="GRPO loss")
        timings["policy_s"] += _clock(device) - t0
        if m < local_micro:
            sums["loss"] += float(loss.detach()) * share
            sums["kl"] += float(kl) * tokens_m
            sums["clip_frac"] += float(clip) * tokens_m
            sums["tokens"] += tokens_m
    return sums


def _reduce_counts(rows: int, tokens: int, micro: int, device) -> tuple[int, int, int]:
    """Global rows and tokens (sums) and the most micro-batches any rank has (max, via a one-hot sum)."""
    if world_size() == 1:
        return rows, tokens, micro
    world = world_size()
    onehot = [0.0] * world
    onehot[rank()] = float(micro)
    reduced = all_reduce_sum([rows, tokens] + onehot, device)
    return int(reduced[0]), int(reduced[1]), int(max(reduced[2:]))
