"""GRPO rollouts and their rule rewards (METHOD.md, Eq. 10-11): the generation half of one GRPO step.

For a batch of examples, every one of its G samples shows the responses in a freshly shuffled order, keyed by
(seed, step, example id, sample index); samples of one example that drew the same order are ONE decoder
request with n = their count, so each prompt variant is prefilled once. Prompts, permutations and noise seeds
come from the same code as GRM scoring (grm_engine.grm) with a per-step seed, so the policy is trained on
exactly the prompts it is later scored with, and a sample does not depend on which examples share its batch.

The reward never leaves the device and never detokenizes: generated ids -> parse_scores_from_tokens (equal to
parse_scores on the decoded text) -> scores mapped back to the original response order -> rule_reward.
Text exists only in decode_samples, for logs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..gpu_scoring import parse_scores_from_tokens
from ..grm import GRM, _stable_int
from ..parsing import ParseStatus
from ..templates import resolve_template
from ..voting import rule_reward


@dataclass
class Rollouts:
    """N = len(examples) * group_size samples; rows g*G .. g*G+G-1 belong to example g. Tensors sit on the
    decoder's device; n_max = the most responses of any example in the batch."""

    example_index: torch.LongTensor  # [N] index into the examples list
    permutation: torch.LongTensor  # [N, n_max]: original index of the response shown at position p (identity past n)
    prompt_ids: list[list[int]]  # [N]; samples that share a permutation share the list object
    completion_ids: torch.LongTensor  # [N, T_max], right-padded with 0
    completion_mask: torch.BoolTensor  # [N, T_max]
    completion_logprobs: torch.Tensor | None  # [N, T_max] fp32 sampling log-probs (return_logprobs), 0 at padding
    scores: torch.Tensor  # [N, n_max] float32 parsed scores in the ORIGINAL response order, NaN where absent
    status: torch.Tensor  # [N] int8 ParseStatus
    correct: torch.BoolTensor  # [N] Eq. 10, strict
    rewards: torch.Tensor  # [N] float32 +1 / -1 (Eq. 11; unparseable = -1)
    finish_reasons: list[str]  # [N] "stop" or "length"
    seconds: float  # generation + reward wall time
    generated_tokens: int
    # added beyond the loop's contract: what logging and checks need
    group_size: int = 1  # G
    completion_lengths: torch.LongTensor | None = None  # [N] tokens generated (EOS included when it stopped there)
    num_responses: torch.LongTensor | None = None  # [N] n of each row's example
    targets: torch.Tensor | None = None  # [N] float64: best index (n >= 2) or label (n = 1)
    example_ids: list[str] | None = None  # [len(examples)]
    prompt_tokens: int = 0  # tokens of the distinct prompt variants (what is prefilled)

    @property
    def num_samples(self) -> int:
        return int(self.rewards.shape[0])


@dataclass
class RewardResult:
    scores: torch.Tensor  # [N, n_max] float32 in the ORIGINAL order
    status: torch.Tensor  # [N] int8
    correct: torch.Tensor  # [N] bool
    rewards: torch.Tensor  # [N] float32 +1 / -1


def rollout_seed(seed: int, step: int) -> int:
    """The seed GRM's permutation and noise keys get at a GRPO step: every step draws new orders and noise."""
    return _stable_int("grpo-rollout", seed, step)


def rewards_from_tokens(completion_ids: torch.Tensor, lengths: torch.Tensor, vocab_bytes, permutation: torch.Tensor,
                        targets: torch.Tensor, num_responses, *, lo: float, hi: float) -> RewardResult:
    """Rule rewards of generated ids, on their device.

    completion_ids [N, T] (ids past lengths[i] ignored), lengths [N], permutation [N, n_max] (shown position ->
    original index; identity past n), targets [N] (best index for n >= 2, label for n = 1), num_responses
    [N] or int, lo / hi the template's score range (PromptTemplate.score_range)."""
    device = completion_ids.device
    rows, n_max = permutation.shape
    counts = torch.as_tensor(num_responses, device=device).reshape(-1).expand(rows).long()
    parsed = parse_scores_from_tokens(completion_ids, lengths, vocab_bytes, counts, lo=lo, hi=hi)
    shown = parsed.scores.to(device)  # [N, width], width = max(num_responses) <= n_max
    if shown.shape[1] < n_max:
        shown = torch.cat([shown, shown.new_full((rows, n_max - shown.shape[1]), float("nan"))], dim=1)
    original = torch.full_like(shown, float("nan")).scatter_(1, permutation.to(device).long(), shown)  # [N, n_max]
    status = parsed.status.to(device)
    targets = torch.as_tensor(targets, device=device, dtype=torch.float64)
    rewards = rule_reward(original, status, targets, num_responses=counts)  # Eq. 11; one pass gives Eq. 10 too
    return RewardResult(original, status, rewards > 0, rewards)


def _check_inputs(examples, num_generations: int, template: str, max_completion_length: int) -> None:
    if not examples:
        raise ValueError("generate_rollouts: no examples")
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations = {num_generations!r} must be an int >= 1")
    if not isinstance(max_completion_length, int) or max_completion_length < 1:
        raise ValueError(f"max_completion_length = {max_completion_length!r} must be an int >= 1")
    single = resolve_template(template).variant == "single"  # TemplateError (a ValueError) names a bad template
    for example in examples:
        n = example.num_responses
        if single and n != 1:
            raise ValueError(f"example {example.id!r}: template {template!r} scores one response, this one has {n}")
        if (example.best if n >= 2 else example.label) is None:
            raise ValueError(f"example {example.id!r}: no {'best' if n >= 2 else 'label'} to reward against")


def _pad(rows: Sequence[Sequence], width: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=dtype)  # [N, width], right-padded with 0
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def generate_rollouts(decoder, tokenizer, vocab_bytes, examples, *, num_generations: int, temperature: float,
                      top_p: float = 1.0, max_completion_length: int, seed: int, step: int, template: str = "default",
                      shuffle: bool = True, return_logprobs: bool = False, ignore_eos: bool = False) -> Rollouts:
    """G = num_generations critiques per example from `decoder` (built on the live policy), with rewards.

    Permutations and noise are keyed by (seed, step, example id, sample index / permutation), so the same
    (seed, step) reproduces every sample whatever the order or batching of the examples. A prompt longer than
    the decoder's context is a ValueError naming the example, raised before anything is generated.
    """
    examples = list(examples)
    _check_inputs(examples, num_generations, template, max_completion_length)
    lo, hi = resolve_template(template).score_range
    G, B = num_generations, len(examples)
    step_seed = rollout_seed(seed, step)
    sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_completion_length, ignore_eos=ignore_eos,
                    logprobs=return_logprobs)
    # GRM's request builder: the same prompts, permutations and per-request noise seeds as scoring
    prompts, params, owners, perms = GRM(decoder, tokenizer, template=template)._requests(
        examples, G, step_seed, shuffle, sampling)

    start = time.perf_counter()
    outputs = decoder.generate(prompts, params, use_tqdm=False)
    N = B * G
    token_ids, logprobs = [None] * N, [None] * N
    finish, prompt_ids = [None] * N, [None] * N
    for request, (g, sample_indices) in zip(outputs, owners):
        for out in request.outputs:
            row = g * G + sample_indices[out.index]
            token_ids[row], logprobs[row], finish[row] = out.token_ids, out.logprobs, out.finish_reason
            prompt_ids[row] = prompts[request.request_index]

    device = decoder.model.device
    lengths_host = [len(ids) for ids in token_ids]
    width = max(lengths_host)
    completion_ids = torch.from_numpy(_pad(token_ids, width, np.int64)).to(device)  # [N, T_max]
    lengths = torch.tensor(lengths_host, device=device)  # [N]
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [N, T_max]
    completion_logprobs = None
    if return_logprobs:
        completion_logprobs = torch.from_numpy(_pad(logprobs, width, np.float32)).to(device)  # [N, T_max]

    n_max = max(e.num_responses for e in examples)
    perm_host = np.tile(np.arange(n_max), (N, 1))  # [N, n_max], identity past each example's n
    for g, example in enumerate(examples):
        perm_host[g * G:(g + 1) * G, : example.num_responses] = perms[g]
    permutation = torch.from_numpy(perm_host).to(device)
    example_index = torch.arange(B, device=device).repeat_interleave(G)  # [N]
    num_responses = torch.tensor([e.num_responses for e in examples], device=device).repeat_interleave(G)
    targets = torch.tensor([float(e.best if e.num_responses >= 2 else e.label) for e in examples],
                           dtype=torch.float64, device=device).repeat_interleave(G)

    reward = rewards_from_tokens(completion_ids, lengths, vocab_bytes, permutation, targets, num_responses,
                                 lo=lo, hi=hi)
    return Rollouts(
        example_index=example_index, permutation=permutation, prompt_ids=prompt_ids, completion_ids=completion_ids,
        completion_mask=mask, completion_logprobs=completion_logprobs, scores=reward.scores, status=reward.status,
        correct=reward.correct, rewards=reward.rewards, finish_reasons=finish,
        seconds=time.perf_counter() - start, generated_tokens=sum(lengths_host), group_size=G,
        completion_lengths=lengths, num_responses=num_responses, targets=targets,
        example_ids=[e.id for e in examples], prompt_tokens=sum(len(p) for p in prompts))


def rollout_metrics(rollouts: Rollouts) -> dict:
    """Per-step rollout metrics as Python floats (one device-to-host copy)."""
    rewards, G = rollouts.rewards.float(), rollouts.group_size
    lengths = rollouts.completion_mask.sum(dim=1).float()  # [N]
    grouped = rewards.reshape(-1, G)  # [B, G]
    values = [rewards.mean(), rewards.std(unbiased=False), rollouts.correct.float().mean(), lengths.mean(),
              lengths.max(), (grouped == grouped[:, :1]).all(dim=1).float().mean()]
    failures = [s for s in ParseStatus if s != ParseStatus.OK]
    values += [(rollouts.status == s).float().mean() for s in failures]
    host = torch.stack(values).tolist()
    metrics = dict(zip(["reward_mean", "reward_std", "accuracy", "completion_length_mean", "completion_length_max",
                        "zero_advantage_group_fraction"], host))
    metrics.update({f"parse_failure_rate/{s.name}": v for s, v in zip(failures, host[6:])})
    metrics["parse_failure_rate"] = sum(host[6:])
    metrics["truncated_fraction"] = sum(r == "length" for r in rollouts.finish_reasons) / max(len(rollouts.finish_reasons), 1)
    metrics["generated_tokens"] = rollouts.generated_tokens
    metrics["rollout_seconds"] = rollouts.seconds
    metrics["rollout_tokens_per_second"] = rollouts.generated_tokens / max(rollouts.seconds, 1e-9)
    return metrics


def decode_samples(rollouts: Rollouts, tokenizer, count: int) -> list[dict]:
    """The first `count` samples as text with their scores and rewards, for logs only."""
    count = min(count, rollouts.num_samples)
    rows = slice(0, count)
    ids, lengths = rollouts.completion_ids[rows].cpu(), rollouts.completion_mask[rows].sum(dim=1).cpu()
    scores, status = rollouts.scores[rows].cpu(), rollouts.status[rows].cpu()
    permutation, rewards = rollouts.permutation[rows].cpu(), rollouts.rewards[rows].cpu()
    example_index = rollouts.example_index[rows].cpu()
    n_rows = (rollouts.num_responses[rows].cpu() if rollouts.num_responses is not None
              else (~torch.isnan(scores)).sum(dim=1).clamp(min=1))
    samples = []
    for i in range(count):
        g, n = int(example_index[i]), int(n_rows[i])
        samples.append({
            "example": rollouts.example_ids[g] if rollouts.example_ids else g,
            "sample": i % rollouts.group_size,
            "permutation": permutation[i, :n].tolist(),
            "completion": tokenizer.decode(ids[i, : int(lengths[i])].tolist(), skip_special_tokens=True),
            "scores": [None if v != v else v for v in scores[i, :n].tolist()],
            "status": ParseStatus(int(status[i])).name,
            "reward": float(rewards[i]),
            "num_tokens": int(lengths[i]),
            "finish_reason": rollouts.finish_reasons[i],
        })
    return samples
