"""From generated token ids to scores, votes and rewards on the GPU (grm_engine._cuda).

`parse_scores_from_tokens` is the public op: CUDA kernel for CUDA tensors, otherwise (and as the
reference) `parse_scores` on the text VocabBytes decodes. `vote_cuda`, `is_correct_cuda` and
`rule_reward_cuda` are the fast paths that the dispatchers in grm_engine.voting call for CUDA
tensors; they give exactly the results of `vote`, `is_correct` and `rule_reward`.
"""
from __future__ import annotations

import numpy as np
import torch

from ._backends import _cuda, forced_backend
from .parsing import ParsedScores, parse_scores
from .vocab_bytes import VocabBytes
from .voting import VoteResult

_VOTE_ERRORS = {1: "n_responses[{g}] is outside 1..n_max", 2: "perm[{g}] is not a permutation of 0..n-1 for some sample",
                3: "meta has NaN for a valid sample in group {g}; meta-RM scores must be finite",
                4: "best[{g}] is not a response index for its row"}


def cuda_available_for(*tensors: torch.Tensor) -> bool:
    """True when the CUDA extension is built and every tensor is on a CUDA device."""
    return _cuda is not None and all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def _counts(num_responses, n_rows: int, device) -> tuple[torch.Tensor, int]:
    """num_responses (int or [N]) -> (int32 [N] on device, n_max); one host sync for a GPU tensor."""
    if isinstance(num_responses, (int, np.integer)) or (isinstance(num_responses, torch.Tensor) and num_responses.dim() == 0):
        value = int(num_responses)
        if value < 1:
            raise ValueError(f"num_responses = {value}: every critique scores at least one response")
        return torch.full((n_rows,), value, dtype=torch.int32, device=device), value
    counts = torch.as_tensor(num_responses).reshape(-1)
    if counts.shape[0] != n_rows:
        raise ValueError(f"num_responses has {counts.shape[0]} entries for {n_rows} sequences")
    if n_rows == 0:
        return counts.to(device=device, dtype=torch.int32), 0
    low, high = (int(v) for v in torch.aminmax(counts))
    if low < 1:
        bad = int(torch.argmin(counts))
        raise ValueError(f"num_responses[{bad}] = {low}: every critique scores at least one response")
    return counts.to(device=device, dtype=torch.int32), high


def parse_scores_from_tokens_reference(token_ids: torch.Tensor, lengths, vocab_bytes: VocabBytes, num_responses,
                                       *, lo: float = 1, hi: float = 10) -> ParsedScores:
    """The specification: parse_scores on the decoded text of each row's first lengths[i] ids."""
    ids = token_ids.detach().cpu()
    lengths = torch.as_tensor(lengths).reshape(-1).cpu().tolist()
    texts = [vocab_bytes.decode_bytes(ids[i, : max(0, min(int(lengths[i]), ids.shape[1]))].tolist()).decode("utf-8")
             for i in range(ids.shape[0])]
    result = parse_scores(texts, num_responses.cpu() if isinstance(num_responses, torch.Tensor) else num_responses,
                          lo=lo, hi=hi)
    return ParsedScores(result.scores.to(token_ids.device), result.status.to(token_ids.device))


def parse_scores_cuda(token_ids: torch.Tensor, lengths: torch.Tensor, vocab_bytes: VocabBytes, num_responses,
                      *, lo: float = 1, hi: float = 10) -> ParsedScores:
    """The CUDA kernel; token_ids [N, L] int32/int64 on a CUDA device, lengths [N]."""
    if _cuda is None:
        raise RuntimeError("grm_engine._cuda is not built; reinstall on a machine with a CUDA toolkit "
                           "(pip install --no-build-isolation .) or use the CPU path")
    if token_ids.dim() != 2 or token_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_ids must be [N, L] int32 or int64, got {tuple(token_ids.shape)} {token_ids.dtype}")
    device = token_ids.device
    n_rows = token_ids.shape[0]
    if token_ids.stride(1) != 1:
        token_ids = token_ids.contiguous()
    lengths = torch.as_tensor(lengths, device=device).reshape(-1)
    if lengths.shape[0] != n_rows:
        raise ValueError(f"lengths has {lengths.shape[0]} entries for {n_rows} sequences")
    counts, n_max = _counts(num_responses, n_rows, device)
    entries, flags, blob = vocab_bytes.device_tables(device)
    scores, status = _cuda.parse_scores_from_tokens(token_ids, lengths.to(torch.int32).contiguous(), counts,
                                                    entries, flags, blob, n_max, float(lo), float(hi))
    return ParsedScores(scores, status)


def parse_scores_from_tokens(token_ids: torch.Tensor, lengths, vocab_bytes: VocabBytes, num_responses,
                             *, lo: float = 1, hi: float = 10) -> ParsedScores:
    """Scores [N, n_max] and status [N] of generated ids, equal to `parse_scores` on their decoded text.

    token_ids [N, L] (ids past lengths[i] are ignored), lengths [N], vocab_bytes built once from
    the tokenizer, num_responses an int or [N]. CUDA tensors use the kernel (no host round trip
    except reading max(num_responses) when it is a GPU tensor); GRM_ENGINE_BACKEND=reference
    forces the decode + parse_scores path.
    """
    if forced_backend() != "reference" and cuda_available_for(token_ids):
        return parse_scores_cuda(token_ids, lengths, vocab_bytes, num_responses, lo=lo, hi=hi)
    return parse_scores_from_tokens_reference(token_ids, lengths, vocab_bytes, num_responses, lo=lo, hi=hi)


def _raise_first_error(errors: torch.Tensor, name: str) -> None:
    bad = torch.nonzero(errors)
    if bad.numel():  # one small device-to-host copy; skipped with validate=False
        g = int(bad[0, 0])
        raise ValueError(f"{name}: " + _VOTE_ERRORS.get(int(errors[g]), "error code {code}").format(g=g, code=int(errors[g])))


def vote_cuda(scores: torch.Tensor, status: torch.Tensor, *, perm=None, n_responses=None, meta=None,
              k_meta: int | None = None, validate: bool = True) -> VoteResult:
    """`grm_engine.voting.vote` on the GPU, exactly. validate=False skips the one host read of
    the per-group error codes (bad n_responses, perm, NaN meta), for use inside graphs/hot loops."""
    if scores.dim() != 3:
        raise ValueError(f"scores must be [G, k, n_max], got shape {tuple(scores.shape)}")
    groups, k, n_max = scores.shape
    device = scores.device
    if tuple(status.shape) != (groups, k):
        raise ValueError(f"status must be [G, k] = {(groups, k)}, got {tuple(status.shape)}")
    if perm is not None and tuple(perm.shape) != (groups, k, n_max):
        raise ValueError(f"perm must be [G, k, n_max] = {(groups, k, n_max)}, got {tuple(perm.shape)}")
    if meta is not None:
        if tuple(meta.shape) != (groups, k):
            raise ValueError(f"meta must be [G, k] = {(groups, k)}, got {tuple(meta.shape)}")
        k_meta = max(1, k // 2) if k_meta is None else int(k_meta)
        if not 1 <= k_meta <= k:
            raise ValueError(f"k_meta = {k_meta} must be in 1..k (k = {k})")
    elif k_meta is not None:
        raise ValueError("k_meta needs meta scores (meta=[G, k])")
    if n_responses is not None:
        n_responses = torch.as_tensor(n_responses, device=device).reshape(-1)
        if n_responses.shape[0] != groups:
            raise ValueError(f"n_responses must be [G] = [{groups}], got {tuple(n_responses.shape)}")
        n_responses = n_responses.to(torch.int32).contiguous()

    def prepare(t, dtype):
        return None if t is None else torch.as_tensor(t, device=device).to(dtype).contiguous()

    totals, best, used, errors = _cuda.vote(prepare(scores.detach(), torch.float32), prepare(status, torch.int8),
                                            prepare(perm, torch.int32), n_responses,
                                            prepare(meta, torch.float32), int(k_meta or 0))
    if validate:
        _raise_first_error(errors, "vote")
    return VoteResult(totals, best, used)


def is_correct_cuda(scores: torch.Tensor, status: torch.Tensor, best, *, num_responses=None,
                    validate: bool = True) -> torch.Tensor:
    """`grm_engine.voting.is_correct` on the GPU, exactly: bool [N]."""
    return _correct_and_reward(scores, status, best, num_responses, validate)[0]


def rule_reward_cuda(scores: torch.Tensor, status: torch.Tensor, best, *, num_responses=None,
                     validate: bool = True) -> torch.Tensor:
    """`grm_engine.voting.rule_reward` on the GPU, exactly: float32 [N] of +1 / -1."""
    return _correct_and_reward(scores, status, best, num_responses, validate)[1]


def _correct_and_reward(scores, status, best, num_responses, validate):
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor [N, n_max], got {getattr(scores, 'shape', type(scores))}")
    rows, n_max = scores.shape
    device = scores.device
    status = torch.as_tensor(status, device=device).reshape(-1)
    best = torch.as_tensor(best, device=device).reshape(-1)
    if status.shape[0] != rows or best.shape[0] != rows:
        raise ValueError(f"scores has {rows} rows but status has {status.shape[0]} and best {best.shape[0]}")
    counts = None
    if num_responses is not None:
        counts = torch.as_tensor(num_responses, device=device).reshape(-1).expand(rows).to(torch.int64).contiguous()
    correct, reward, errors = _cuda.rule_reward(scores.detach().float().contiguous(), status.to(torch.int8).contiguous(),
                                                best.to(torch.float64).contiguous(), counts)
    if validate:
        _raise_first_error(errors, "is_correct")
    return correct, reward
