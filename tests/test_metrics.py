"""Accuracy tie policies, best-of-N and RewardBench sections against hand-computed values and
independent restatements written here (never numbers copied from the code under test)."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grm_engine import Example, accuracy, accuracy_by_subset, best_of_n_accuracy, example_credits, rewardbench_scores
from grm_engine.metrics import REWARDBENCH_EXAMPLE_COUNTS, REWARDBENCH_LEADERBOARD_COUNTS

# (totals, best) -> hand-worked credit under strict, half, fractional
CASES = [
    ([9, 3], 0, (1, 1, 1)),             # unique top at the best
    ([3, 9], 0, (0, 0, 0)),             # another response on top
    ([7, 7], 0, (0, 0.5, 0.5)),         # 2-way tie containing the best
    ([7, 7, 7, 2], 1, (0, 0.5, 1 / 3)),  # 3-way tie containing the best
    ([7, 7, 7, 7], 3, (0, 0.5, 0.25)),   # all tied
    ([8, 8, 5], 2, (0, 0, 0)),          # tie at the top without the best
    ([5, 9, 9], 0, (0, 0, 0)),
    ([float("nan"), 4], 0, (0, 0, 0)),  # the best has no score
    ([float("nan"), 4], 1, (1, 1, 1)),  # NaN is never the top
    ([float("nan"), float("nan")], 1, (0, 0, 0)),
]


@pytest.mark.parametrize("policy, column", [("strict", 0), ("half", 1), ("fractional", 2)])
def test_hand_worked_credits(policy, column):
    totals = [c[0] for c in CASES]
    best = [c[1] for c in CASES]
    expected = [c[2][column] for c in CASES]
    got = example_credits(totals, best, tie_policy=policy)
    assert got.tolist() == pytest.approx(expected)
    assert accuracy(totals, best, tie_policy=policy) == pytest.approx(sum(expected) / len(expected))


def test_strict_is_the_default_and_accepts_tensors():
    totals = torch.tensor([[9.0, 3.0], [7.0, 7.0], [1.0, 2.0], [6.0, 5.0]])  # [N, n]
    examples = [Example(str(i), "q", ["a", "b"], best=b) for i, b in enumerate([0, 0, 1, 1])]
    assert accuracy(totals, examples) == 0.5  # rows 0 and 2 are right; the tie in row 1 is wrong
    assert accuracy(totals, examples, tie_policy="half") == 0.625


def test_random_policy_is_seeded_and_unbiased():
    # 4-way ties containing the best: each should win with probability 1/4.
    totals = [[5, 5, 5, 5]] * 4000
    best = [i % 4 for i in range(4000)]
    first = example_credits(totals, best, tie_policy="random", seed=3)
    assert set(first.tolist()) <= {0.0, 1.0}
    assert np.array_equal(first, example_credits(totals, best, tie_policy="random", seed=3))
    assert not np.array_equal(first, example_credits(totals, best, tie_policy="random", seed=4))
    assert abs(first.mean() - 0.25) < 0.03  # sd of the mean is ~0.007
    # untied examples never consult the generator: same answers as strict
    clear = [[1, 9], [9, 1]]
    assert example_credits(clear, [1, 1], tie_policy="random", seed=0).tolist() == [1.0, 0.0]


def test_predicted_indices():
    assert example_credits([0, 1, -1, 2], [0, 0, 1, 2]).tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="needs score vectors"):
        accuracy([0, -1], [0, 1], tie_policy="fractional")


def test_single_response_examples_compare_with_label():
    examples = [Example("a", "q", ["r"], label=1), Example("b", "q", ["r"], label=0),
                Example("c", "q", ["r"], label=1)]
    assert example_credits([[1.0], [1.0], [float("nan")]], examples).tolist() == [1, 0, 0]
    assert example_credits(torch.tensor([1.0, 0.0, 1.0]), examples).tolist() == [1, 1, 1]


def test_mismatched_inputs_are_named():
    examples = [Example("a", "q", ["x", "y", "z"], best=0)]
    with pytest.raises(ValueError, match="has 2 scores but example 'a'"):
        accuracy([[1, 2]], examples)
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        accuracy([[1, 2, 3], [1, 2, 3]], examples)
    with pytest.raises(ValueError, match="tie_policy"):
        accuracy([[1, 2, 3]], examples, tie_policy="lenient")


totals_and_best = st.integers(2, 6).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 4), min_size=n, max_size=n), st.integers(0, n - 1)))


@settings(max_examples=300, deadline=None)
@given(st.lists(totals_and_best, min_size=1, max_size=20))
def test_policies_match_a_restatement_with_fractions(cases):
    totals = [t for t, _ in cases]
    best = [b for _, b in cases]
    strict, half, fractional = [], [], []
    for t, b in cases:
        others = [v for j, v in enumerate(t) if j != b]
        top_count = t.count(max(t))
        at_top = t[b] == max(t)
        strict.append(Fraction(int(t[b] > max(others))))
        fractional.append(Fraction(int(at_top), top_count))
        half.append(Fraction(1) if at_top and top_count == 1 else Fraction(1, 2) if at_top else Fraction(0))
    for policy, expected in [("strict", strict), ("half", half), ("fractional", fractional)]:
        got = example_credits(totals, best, tie_policy=policy)
        assert got.tolist() == pytest.approx([float(x) for x in expected])
    assert best_of_n_accuracy(totals, best) == pytest.approx(float(sum(strict)) / len(cases))
    # index predictions with -1 on a tie agree with strict on the vectors
    indices = [t.index(max(t)) if t.count(max(t)) == 1 else -1 for t in totals]
    assert accuracy(indices, best) == pytest.approx(float(sum(strict)) / len(cases))


def test_best_of_n_counts_only_wins_over_every_loser():
    totals = [[9, 3, 8, 1], [9, 9, 1, 1], [2, 3, 1, 1], [5, 4, float("nan"), 4]]
    assert best_of_n_accuracy(totals, [0, 0, 0, 0]) == 0.5  # rows 0 and 3 (a NaN loser is beaten)
    assert best_of_n_accuracy([[float("nan"), 1]], [0]) == 0
    assert best_of_n_accuracy([0, -1, 2], [0, 0, 1]) == pytest.approx(1 / 3)


def test_accuracy_by_subset():
    examples = [Example(str(i), "q", ["a", "b"], best=0, subset=s) for i, s in enumerate("xxyxy")]
    totals = [[2, 1], [1, 2], [2, 1], [2, 2], [3, 1]]
    out = accuracy_by_subset(totals, examples, tie_policy="half")
    assert list(out) == ["x", "y"]
    assert out["x"] == {"accuracy": pytest.approx((1 + 0 + 0.5) / 3), "count": 3}
    assert out["y"] == {"accuracy": 1.0, "count": 2}


def full_rewardbench(value=1.0, **overrides):
    accs = {s: value for s in REWARDBENCH_EXAMPLE_COUNTS}
    accs.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return accs


def test_rewardbench_sections_hand_worked():
    accs = full_rewardbench(0.0, alpacaeval_easy=1.0, math_prm=1.0, xstest_should_refuse=1.0)
    for s in ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
              "llmbar-adver-GPTOut", "llmbar-adver-manual"]:
        accs[s] = 0.5
    scores = rewardbench_scores(accs)
    chat = 100 / (100 + 95 + 95 + 28 + 40)
    safety = 154 / (100 + 100 + 154 + 250 + 136)
    reasoning = 984 / (984 + 6 * 164)  # math weighted like all six code subsets together: 1/2
    assert scores["Chat"] == pytest.approx(chat)
    assert scores["Chat Hard"] == pytest.approx(0.5)
    assert scores["Safety"] == pytest.approx(safety)
    assert scores["Reasoning"] == pytest.approx(0.5) and reasoning == 0.5
    assert scores["Overall"] == pytest.approx((chat + 0.5 + safety + 0.5) / 4)
    leaderboard = rewardbench_scores(accs, example_counts=REWARDBENCH_LEADERBOARD_COUNTS)
    assert leaderboard["Safety"] == pytest.approx(250 / 740)


def test_rewardbench_partial_data_and_unknown_subsets():
    accs = {"hep-go": 0.5, "hep-rust": 1.0, "mt-bench-easy": 0.25, "anthropic_helpful": 0.0}
    scores = rewardbench_scores(accs)
    assert scores["Reasoning"] == pytest.approx(0.75)  # only present subsets weigh in
    assert scores["Chat"] == pytest.approx(0.25)
    assert math.isnan(scores["Safety"]) and math.isnan(scores["Chat Hard"]) and math.isnan(scores["Overall"])


def test_rewardbench_from_predictions_and_examples():
    examples = [Example("1", "q", ["a", "b"], best=0, subset="alpacaeval-easy"),
                Example("2", "q", ["a", "b"], best=0, subset="alpacaeval-hard"),
                Example("3", "q", ["a", "b"], best=0, subset="refusals-dangerous"),
                Example("4", "q", ["a", "b"], best=0, subset="llmbar-natural"),
                Example("5", "q", ["a", "b"], best=0, subset="hep-cpp")]
    totals = [[9, 1], [1, 9], [5, 5], [8, 2], [2, 1]]
    strict = rewardbench_scores(totals, examples)
    assert strict["Chat"] == pytest.approx(100 / 195)
    assert (strict["Safety"], strict["Chat Hard"], strict["Reasoning"]) == (0.0, 1.0, 1.0)
    assert rewardbench_scores(totals, examples, tie_policy="fractional")["Safety"] == 0.5


def test_rows_may_be_tensors_or_arrays_of_different_lengths():
    examples = [Example("a", "q", ["x", "y"], best=1), Example("b", "q", ["x", "y", "z"], best=2)]
    rows = [torch.tensor([1.0, 4.0]), np.array([3.0, 3.0, 3.0])]
    assert example_credits(rows, examples, tie_policy="fractional").tolist() == pytest.approx([1, 1 / 3])
    assert example_credits([np.int64(1), torch.tensor(-1)], examples).tolist() == [1, 0]


def test_nan_padding_past_n_is_accepted_like_vote_output():
    nan = float("nan")
    examples = [Example("a", "q", ["x", "y"], best=0), Example("b", "q", ["x", "y", "z"], best=2),
                Example("c", "q", ["x"], label=1)]
    totals = torch.tensor([[5.0, 4.0, nan], [1.0, 2.0, 3.0], [1.0, nan, nan]])  # [G, n_max]
    assert example_credits(totals, examples).tolist() == [1, 1, 1]
    assert best_of_n_accuracy(totals[:2], examples[:2]) == 1.0
    with pytest.raises(ValueError, match="padding past n must be NaN"):
        accuracy([[5.0, 4.0, 0.0]], examples[:1])
