"""Correctness (paper Eq. 10), the rule reward (Eq. 11) and voting over k sampled critiques.

These plain PyTorch functions are the specification; the CUDA kernels in csrc/cuda/ must
give exactly the same results. All of them take the output of `parse_scores`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backends import forced_backend
from .parsing import ParseStatus


def _cuda_path(*tensors) -> bool:
    """The CUDA kernels (grm_engine/gpu_scoring.py) serve CUDA tensors unless a backend is forced."""
    if forced_backend() == "reference" or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        return False
    from .gpu_scoring import cuda_available_for  # imported late: gpu_scoring imports this module

    return cuda_available_for(*tensors)


@dataclass
class VoteResult:
    totals: torch.Tensor  # float32 [G, n_max]: summed scores in the original response order; NaN past n_responses
    best: torch.Tensor  # int64 [G]: index of the unique top total, -1 when the top is tied (or nothing was valid)
    used: torch.Tensor  # bool [G, k]: the samples that were summed


def _check_2d(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [N, n_max], got {getattr(tensor, 'shape', type(tensor))}")


def is_correct(scores: torch.Tensor, status: torch.Tensor, best: torch.Tensor, *, num_responses=None) -> torch.Tensor:
    """Eq. 10, strict. scores float [N, n_max] (NaN where absent), status [N], best [N] -> bool [N].

    With n >= 2 responses a sample is correct iff its status is OK and the score of response
    `best` is STRICTLY greater than every other response's score (a tie with the best is wrong).
    With one response, `best` holds the label and the sample is correct iff S_1 == label.
    n per row is `num_responses` ([N] or int) or, if omitted, the number of non-NaN scores of
    the row (exact for OK rows, which are the only ones that can be correct).
    """
    if _cuda_path(scores):
        from .gpu_scoring import is_correct_cuda

        return is_correct_cuda(scores, status, best, num_responses=num_responses)
    _check_2d("scores", scores)
    n_rows, n_max = scores.shape
    status = torch.as_tensor(status, device=scores.device).reshape(-1)
    best = torch.as_tensor(best, device=scores.device).reshape(-1)
    if status.shape[0] != n_rows or best.shape[0] != n_rows:
        raise ValueError(f"scores has {n_rows} rows but status has {status.shape[0]} and best {best.shape[0]}")
    values = scores.double()
    if num_responses is None:
        counts = (~torch.isnan(values)).sum(dim=1)
    else:
        counts = torch.as_tensor(num_responses, device=scores.device).reshape(-1).expand(n_rows).long()
    ok = status == ParseStatus.OK
    single = counts == 1
    multi_best = best.long()
    bad_index = ok & ~single & ((multi_best < 0) | (multi_best >= counts))
    if bad_index.any():
        row = int(bad_index.nonzero()[0, 0])
        raise ValueError(f"best[{row}] = {int(best[row])} is not a response index for a row with {int(counts[row])} responses")

    position = torch.arange(n_max, device=scores.device).expand(n_rows, n_max)
    present = position < counts[:, None]
    safe_best = multi_best.clamp(0, max(n_max - 1, 0))
    best_score = values.gather(1, safe_best[:, None]).squeeze(1) if n_max else values.new_zeros(n_rows)
    others = present & (position != safe_best[:, None])
    beats_all = torch.where(others, best_score[:, None] > values, torch.ones_like(others)).all(dim=1)
    multi_correct = beats_all & (counts >= 2)
    single_correct = single & (values[:, 0] == best.double()) if n_max else torch.zeros_like(single)
    return ok & torch.where(single, single_correct, multi_correct)


def rule_reward(scores: torch.Tensor, status: torch.Tensor, best: torch.Tensor, *, num_responses=None) -> torch.Tensor:
    """Eq. 11: +1 where `is_correct`, -1 otherwise (unparseable or wrong-count samples get -1). float32 [N]."""
    if _cuda_path(scores):
        from .gpu_scoring import rule_reward_cuda

        return rule_reward_cuda(scores, status, best, num_responses=num_responses)
    correct = is_correct(scores, status, best, num_responses=num_responses)
    return torch.where(correct, 1.0, -1.0).to(torch.float32)


def select_by_meta(valid: torch.Tensor, meta: torch.Tensor, k_meta: int) -> torch.Tensor:
    """bool [G, k]: the k_meta valid samples with the highest meta score per group.

    Equal meta scores go to the lower sample index; an invalid sample never takes a place;
    a group with fewer than k_meta valid samples keeps all of them.
    """
    groups, k = valid.shape
    chosen = torch.zeros_like(valid)
    for g in range(groups):
        candidates = [j for j in range(k) if bool(valid[g, j])]
        # Sort by meta score descending, then by sample index ascending (a stable sort on -meta).
        candidates.sort(key=lambda j: (-float(meta[g, j]), j))
        for j in candidates[:k_meta]:
            chosen[g, j] = True
    return chosen


def vote(scores: torch.Tensor, status: torch.Tensor, *, perm: torch.Tensor | None = None,
         n_responses: torch.Tensor | None = None, meta: torch.Tensor | None = None,
         k_meta: int | None = None) -> VoteResult:
    """Voting over k samples per group (METHOD.md, inference-time scaling).

    scores [G, k, n_max] float: sample j's score for the response it showed at position p.
    status [G, k]: ParseStatus per sample; only OK samples are summed.
    perm [G, k, n_max] int: perm[g, j, p] = original index of the response shown at position p
        (None: no shuffling). Scores are mapped back to the original order before summing.
    n_responses [G]: responses per group (ragged groups); positions past it are ignored.
    meta [G, k] float: meta-RM scores; then only the top k_meta valid samples are summed
        (k_meta defaults to k // 2, at least 1).
    Totals are float32 sums in sample order j = 0..k-1; best = -1 when the top total is tied,
    which includes a group where no sample was valid (every total is 0).
    CUDA tensors go to the CUDA kernel (same results, exactly) when grm_engine._cuda is built.
    """
    if _cuda_path(scores):
        from .gpu_scoring import vote_cuda

        return vote_cuda(scores, status, perm=perm, n_responses=n_responses, meta=meta, k_meta=k_meta)
    if scores.dim() != 3:
        raise ValueError(f"scores must be [G, k, n_max], got shape {tuple(scores.shape)}")
    groups, k, n_max = scores.shape
    status = torch.as_tensor(status)
    if tuple(status.shape) != (groups, k):
        raise ValueError(f"status must be [G, k] = {(groups, k)}, got {tuple(status.shape)}")
    if n_responses is None:
        n_responses = torch.full((groups,), n_max, dtype=torch.long)
    n_responses = torch.as_tensor(n_responses).reshape(-1).long().cpu()
    if n_responses.shape[0] != groups or bool((n_responses < 1).any()) or bool((n_responses > n_max).any()):
        raise ValueError(f"n_responses must be [G] = [{groups}] with values in 1..{n_max}, got {n_responses.tolist()}")
    if perm is not None:
        perm = torch.as_tensor(perm).long().cpu()
        if tuple(perm.shape) != (groups, k, n_max):
            raise ValueError(f"perm must be [G, k, n_max] = {(groups, k, n_max)}, got {tuple(perm.shape)}")
    scores_cpu = scores.detach().float().cpu()
    valid = (status == ParseStatus.OK).cpu()
    if meta is not None:
        meta = torch.as_tensor(meta).float().cpu()
        if tuple(meta.shape) != (groups, k):
            raise ValueError(f"meta must be [G, k] = {(groups, k)}, got {tuple(meta.shape)}")
        if bool(torch.isnan(meta[valid]).any()):
            raise ValueError("meta has NaN for a valid sample; meta-RM scores must be finite")
        if k_meta is None:
            k_meta = max(1, k // 2)
        if not 1 <= k_meta <= k:
            raise ValueError(f"k_meta = {k_meta} must be in 1..k (k = {k})")
        used = select_by_meta(valid, meta, k_meta)
    else:
        if k_meta is not None:
            raise ValueError("k_meta needs meta scores (meta=[G, k])")
        used = valid.clone()

    totals = torch.full((groups, n_max), float("nan"), dtype=torch.float32)
    best = torch.full((groups,), -1, dtype=torch.long)
    for g in range(groups):
        n = int(n_responses[g])
        total = torch.zeros(n, dtype=torch.float32)
        for j in range(k):
            if perm is not None and sorted(perm[g, j, :n].tolist()) != list(range(n)):
                raise ValueError(f"perm[{g}, {j}, :{n}] = {perm[g, j, :n].tolist()} is not a permutation of 0..{n - 1}")
            if not used[g, j]:
                continue
            for p in range(n):
                original = int(perm[g, j, p]) if perm is not None else p
                total[original] += scores_cpu[g, j, p]
        totals[g, :n] = total
        top = total.max()
        winners = (total == top).nonzero().flatten()
        best[g] = int(winners[0]) if winners.numel() == 1 else -1
    device = scores.device
    return VoteResult(totals.to(device), best.to(device), used.to(device))
