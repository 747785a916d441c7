"""Accuracy of picking the best response, with an explicit tie policy, and benchmark summaries.

A prediction per example is either a score vector (one total per response, e.g. VoteResult.totals)
or a predicted best index (-1 = a tied top). A vector may be padded with NaN past the example's
n responses (as vote() pads ragged groups). Credit per example (n >= 2, best = ground truth b):
  strict      1 iff totals[b] is STRICTLY greater than every other total (paper Eq. 10), else 0.
  half        1 for a unique top at b; 1/2 if the top is tied and b is among the tied (however many
              are tied); 0 otherwise.
  fractional  1/m if b is among the m responses sharing the top, else 0 (RewardBench 2 rule).
  random      the tie is broken uniformly at random: 1 if the draw picks b. One numpy generator
              seeded with `seed`, drawn from in example order, once per example whose
              tied top contains b (every other example needs no draw).
NaN totals mean "no score": they are never the top; if totals[b] is NaN the credit is 0. If every
total is NaN, the credit is 0. vote() gives all-zero totals (a full tie) to an example with no valid
sample; set such rows to NaN (totals[~used.any(1)] = nan) so half/fractional/random give them no
credit. A predicted index only carries the strict rule (-1 scores 0): for the other policies pass
score vectors, which say who is tied.
Single-response examples (n = 1) have a `label`: credit 1 iff the one score equals it (Eq. 10).
The functions default to strict; `grm-engine eval` defaults to random (the paper's shuffle-and-argmax protocol)
and prints tie_rate() next to each accuracy. Training rewards are always strict (rule_reward, Eq. 10/11).
Below: tie_rate, roc_auc (ReaLMistake) and the paper's aggregates (PPE-Correctness, RMB, Overall).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

TIE_POLICIES = ("strict", "half", "fractional", "random")

# RewardBench v1 section weights, as METHOD.md lists them: subset accuracies are averaged within a
# section weighted by these example counts; math-prm (447 rows) is weighted 984 = 6 x 164 so that
# math counts as much as all six code subsets together in Reasoning.
REWARDBENCH_EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
    "mt-bench-easy": 28, "mt-bench-med": 40, "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100, "refusals-offensive": 100,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154, "xstest-should-respond": 250,
    "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
# allenai/reward-bench's own constants swap the two xstest weights (250 refuse / 154 respond, the
# reverse of the dataset's row counts); pass this as example_counts to match its leaderboard exactly.
REWARDBENCH_LEADERBOARD_COUNTS = {**REWARDBENCH_EXAMPLE_COUNTS,
                                  "xstest-should-refuse": 250, "xstest-should-respond": 154}
REWARDBENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}


def _as_rows(predictions: Any) -> list:
    """Per-example predictions as Python objects: a float list (score vector) or an int (index)."""
    if hasattr(predictions, "detach"):  # a torch tensor [N] of indices or [N, n] of totals
        predictions = predictions.detach().cpu().numpy()
    if isinstance(predictions, np.ndarray):
        return predictions.tolist()
    # rows may themselves be tensors or arrays (e.g. a list of VoteResult.totals rows)
    return [row.detach().cpu().tolist() if hasattr(row, "detach") else row.tolist() if hasattr(row, "tolist")
            else row for row in predictions]


def _truth(example: Any, i: int) -> tuple[int | None, float | None, int | None, str]:
    """(best, label, num_responses, name) of the i-th ground truth: an Example or a best index."""
    if isinstance(example, (int, np.integer)) and not isinstance(example, bool):
        return int(example), None, None, f"examples[{i}]"
    name = f"example {example.id!r} (examples[{i}])"
    return example.best, example.label, example.num_responses, name


def _fit(totals: list[float], n: int | None, i: int, name: str) -> list[float]:
    """A score vector cut to the example's n responses; padding past n must be NaN (as vote() pads)."""
    if n is not None and len(totals) != n:
        if len(totals) < n or not all(math.isnan(v) for v in totals[n:]):
            raise ValueError(f"predictions[{i}] has {len(totals)} scores but {name} has {n} responses "
                             "(padding past n must be NaN)")
        totals = totals[:n]
    return totals


def _credit_from_scores(totals: list[float], best: int, tie_policy: str, rng: np.random.Generator) -> float:
    if math.isnan(totals[best]):
        return 0.0
    top = max(v for v in totals if not math.isnan(v))
    tied = [i for i, v in enumerate(totals) if v == top]
    if best not in tied:
        return 0.0
    if len(tied) == 1:
        return 1.0
    if tie_policy == "strict":
        return 0.0
    if tie_policy == "half":
        return 0.5
    if tie_policy == "fractional":
        return 1.0 / len(tied)
    return 1.0 if tied[int(rng.integers(len(tied)))] == best else 0.0


def example_credits(predictions, examples: Sequence, *, tie_policy: str = "strict", seed: int = 0) -> np.ndarray:
    """Credit in [0, 1] per example, float64 [N]; see the module docstring for the rules.

    predictions: N score vectors (lists, or a tensor/array [N, n]) or N predicted indices (-1 = tie).
    examples: N Examples, or N ground-truth best indices.
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy={tie_policy!r}: expected one of {', '.join(TIE_POLICIES)}")
    rows = _as_rows(predictions)
    if len(rows) != len(examples):
        raise ValueError(f"{len(rows)} predictions for {len(examples)} examples; give one per example")
    rng = np.random.default_rng(seed)
    credits = np.zeros(len(rows), dtype=np.float64)
    for i, (row, example) in enumerate(zip(rows, examples)):
        best, label, n, name = _truth(example, i)
        if isinstance(row, (int, np.integer)) and not isinstance(row, bool):
            if label is not None:
                raise ValueError(f"{name} is labelled with a value ({label}); predict its score, not an index")
            if tie_policy != "strict":
                raise ValueError(f"predictions[{i}] is an index; tie_policy={tie_policy!r} needs score vectors "
                                 "(an index cannot say which responses tied)")
            credits[i] = float(int(row) == best and row >= 0)
            continue
        totals = _fit([float(v) for v in (row if isinstance(row, (list, tuple)) else [row])], n, i, name)
        if label is not None:
            credits[i] = float(totals[0] == label)
            continue
        if best is None or not 0 <= best < len(totals):
            raise ValueError(f"{name}: best = {best} is not an index into {len(totals)} scores")
        credits[i] = _credit_from_scores(totals, best, tie_policy, rng)
    return credits


def accuracy(predictions, examples: Sequence, *, tie_policy: str = "strict", seed: int = 0) -> float:
    """Mean credit over the examples (a fraction in [0, 1]); tie_policy: strict | half | fractional | random."""
    if len(examples) == 0:
        raise ValueError("accuracy of zero examples is undefined")
    return float(example_credits(predictions, examples, tie_policy=tie_policy, seed=seed).mean())


def best_of_n_accuracy(predictions, examples: Sequence) -> float:
    """RMB best-of-N: an example counts only if the best response's total is strictly greater than
    EVERY loser's total (a NaN total is "no score": a NaN best wins nothing, a NaN loser is beaten).
    Predicted indices count when they equal the best (-1 never). Equals accuracy(tie_policy="strict")."""
    rows = _as_rows(predictions)
    if len(rows) != len(examples) or not rows:
        raise ValueError(f"{len(rows)} predictions for {len(examples)} examples; give one per example (N > 0)")
    wins = 0
    for i, (row, example) in enumerate(zip(rows, examples)):
        best, _, n, name = _truth(example, i)
        if best is None:
            raise ValueError(f"{name} has no best response (single-response examples are not best-of-N)")
        if isinstance(row, (int, np.integer)):
            wins += int(row == best)
            continue
        row = _fit([float(v) for v in row], n, i, name)
        mine = float(row[best])
        wins += not math.isnan(mine) and all(math.isnan(float(row[j])) or mine > float(row[j])
                                             for j in range(len(row)) if j != best)
    return wins / len(rows)


def accuracy_by_subset(predictions, examples: Sequence, *, tie_policy: str = "strict",
                       seed: int = 0) -> dict[str | None, dict[str, float]]:
    """{subset: {"accuracy": mean credit, "count": examples}} in order of first appearance.
    Ties are broken (random policy) with the same draws as accuracy() on the whole list."""
    credits = example_credits(predictions, examples, tie_policy=tie_policy, seed=seed)
    sums: dict[str | None, list[float]] = {}
    for credit, example in zip(credits, examples):
        sums.setdefault(getattr(example, "subset", None), []).append(float(credit))
    return {subset: {"accuracy": sum(values) / len(values), "count": len(values)}
            for subset, values in sums.items()}


def rewardbench_scores(subset_accuracy, examples: Sequence | None = None, *,
                       example_counts: Mapping[str, int] = REWARDBENCH_EXAMPLE_COUNTS,
                       tie_policy: str = "strict", seed: int = 0) -> dict[str, float]:
    """RewardBench v1 section scores and their plain mean, the official rule:

      section = sum(acc[s] * count[s]) / sum(count[s]) over the section's subsets PRESENT in acc;
      "Overall" = the plain mean of Chat, Chat Hard, Safety and Reasoning.

    subset_accuracy: {subset: accuracy} (any unit; the result is in the same unit), or predictions
    together with `examples` (Examples carrying `subset`), from which subset accuracies are computed
    with tie_policy. Subsets outside the four sections are ignored. A section none of whose subsets
    is present is NaN (and so is Overall): partial data gives no misleading zero.
    """
    if examples is not None:
        per_subset = accuracy_by_subset(subset_accuracy, examples, tie_policy=tie_policy, seed=seed)
        subset_accuracy = {s: v["accuracy"] for s, v in per_subset.items()}
    if not isinstance(subset_accuracy, Mapping):
        raise TypeError("rewardbench_scores takes {subset: accuracy}, or predictions plus examples=")
    scores = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [s for s in subsets if s in subset_accuracy]
        missing = [s for s in present if s not in example_counts]
        if missing:
            raise ValueError(f"example_counts has no weight for {missing}")
        total = sum(example_counts[s] for s in present)
        scores[section] = (sum(float(subset_accuracy[s]) * example_counts[s] for s in present) / total
                           if total else math.nan)
    scores["Overall"] = sum(scores[s] for s in REWARDBENCH_SECTIONS) / len(REWARDBENCH_SECTIONS)
    return scores


def top_is_tied(totals) -> bool:
    """Two or more responses share the top total (NaN totals are "no score" and never tie)."""
    values = [float(v) for v in (totals if isinstance(totals, (list, tuple)) else [totals]) if not math.isnan(float(v))]
    return len(values) > 1 and values.count(max(values)) > 1


def tie_rate(predictions, examples: Sequence | None = None) -> float:
    """Fraction of examples whose top total is tied: the examples a tie policy decides (printed next to each
    accuracy). Score vectors only; with examples, vectors are cut to each example's n (NaN padding)."""
    rows = _as_rows(predictions)
    if not rows:
        raise ValueError("tie rate of zero examples is undefined")
    if examples is not None:
        if len(examples) != len(rows):
            raise ValueError(f"{len(rows)} predictions for {len(examples)} examples; give one per example")
        rows = [_fit([float(v) for v in row], _truth(example, i)[2], i, _truth(example, i)[3])
                for i, (row, example) in enumerate(zip(rows, examples))]
    return sum(top_is_tied(row) for row in rows) / len(rows)


def roc_auc(scores, labels) -> tuple[float, int]:
    """ROC-AUC of `scores` separating label 1 (positive) from label 0 -> (auc, number of NaN scores left out).

    The probability that a random positive scores above a random negative, a tie counting 1/2 (Mann-Whitney U
    over P x N pairs, from average ranks). NaN scores ("no score") are left out and counted; NaN when either
    class has no scored example."""
    scores = np.asarray([float(s) for s in scores], dtype=np.float64)
    labels = np.asarray([float(v) for v in labels], dtype=np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels; give one per example")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()) - {0.0, 1.0})[:3]}")
    scored = ~np.isnan(scores)
    scores, labels = scores[scored], labels[scored]
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan, int((~scored).sum())
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average rank (1-based) over each run of equal scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[labels == 1].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives)), int((~scored).sum())


# ---- the paper's aggregates (METHOD.md, "Evaluation"); all in the unit of their inputs ----
PPE_CORRECTNESS_DOMAINS = ("mmlu-pro", "math", "gpqa", "mbpp-plus", "ifeval")
RMB_CELLS = ("helpfulness/pairwise", "helpfulness/bon", "harmlessness/pairwise", "harmlessness/bon")
PAPER_BENCHMARKS = ("RewardBench", "PPE-Pref", "PPE-Correct", "RMB")


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values and not any(math.isnan(v) for v in values) else math.nan


def ppe_correctness_score(domain_accuracy: Mapping[str, float]) -> float:
    """PPE-Correctness: the plain mean of the per-domain accuracies given (the paper: its five domains,
    PPE_CORRECTNESS_DOMAINS), NaN when none is given."""
    return _mean(domain_accuracy.values())


def rmb_score(cells: Mapping[str, float]) -> float:
    """RMB: the plain mean of helpfulness and harmlessness x pairwise and best-of-N (RMB_CELLS); NaN unless
    all four cells are given (partial data gives no misleading number)."""
    unknown = sorted(set(cells) - set(RMB_CELLS))
    if unknown:
        raise ValueError(f"RMB cells {unknown} are not among {RMB_CELLS}")
    return _mean([cells[c] for c in RMB_CELLS]) if all(c in cells for c in RMB_CELLS) else math.nan


def overall_score(benchmarks: Mapping[str, float]) -> float:
    """Overall (paper Table 2): the plain mean of RewardBench, PPE-Pref, PPE-Correct and RMB; NaN unless all four
    are given and finite."""
    if not all(name in benchmarks for name in PAPER_BENCHMARKS):
        return math.nan
    return _mean([benchmarks[name] for name in PAPER_BENCHMARKS])
