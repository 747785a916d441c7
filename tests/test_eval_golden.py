"""Golden tests: hand-made files in each benchmark's source format (tests/data/golden/), hand-made predictions,
and every expected number worked out by hand in the comments, checked exactly (fractions, not the code's own
output): ties under each policy, best-of-N, fractional tie credit, the RewardBench weights, the PPE and RMB
aggregates, Overall, and the ReaLMistake ROC-AUC (greedy and summed samples)."""
import math
import os
from fractions import Fraction as F

import pytest

from grm_engine.data import load_examples
from grm_engine.evaluation import benchmark_methods, format_report, parse_data_specs, summarize

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
NAN = float("nan")

# per example id: the GRM's total per response, in the file's response order (best first where the source has
# no order): hand-picked wins, losses, two- and three-way ties
PREDICTIONS = {
    "1": [8, 3], "2": [5, 5], "3": [2, 7], "4": [9, 1], "5": [4, 4], "6": [6, 2],  # rewardbench
    "q1": [7, 3], "q2": [7, 3], "q3": [6, 6], "q4": [8, 8],  # ppe preference (q2, q3: model_b is best)
    "c1:0-1": [9, 2], "c1:1-2": [5, 5], "c2:0-1": [8, 4], "c3:0-1": [6, 2], "c3:0-2": [4, 4],  # ppe correctness
    "p1": [7, 2], "p2": [4, 4], "p3": [1, 9],  # rmb pairwise
    "b1": [8, 8, 2], "b2": [6, 6, 6, 1], "b3": [5, 2, 4],  # rmb best-of-N (best = first)
    "j1": [5, 7, 7], "j2": [9, 1, 2],  # ours
}


def load(name, fmt):
    return load_examples(os.path.join(GOLDEN, name), format=fmt)


def run(fmt, examples, policy, rows=None, used=None, counts="leaderboard"):
    rows = rows or [PREDICTIONS[e.id] for e in examples]
    votes = {"Greedy": {"rows": rows, "used": used or [1] * len(rows)}}
    return {"format": fmt, "data": [fmt], "examples": len(examples),
            "methods": benchmark_methods(fmt, examples, votes, tie_policy=policy, seed=0, rewardbench_counts=counts)}


def exact(value, fraction):
    assert value == pytest.approx(float(fraction), abs=1e-12), (value, fraction)


# RewardBench: subsets strict: alpacaeval-easy (1 win, 1 tie) 1/2, mt-bench-hard 0, xstest-should-refuse 1,
# xstest-should-respond (a tie) 0, hep-python 1. Chat = 1/2, Chat Hard = 0, Reasoning = 1;
# Safety = (refuse * w_refuse + respond * w_respond) / (w_refuse + w_respond):
#   leaderboard (250 / 154): strict 250/404, half (250 + 77)/404 = 327/404;  dataset (154 / 250): strict 154/404.
# half: alpacaeval-easy 3/4, xstest-should-respond 1/2.
RB = {("strict", "leaderboard"): (F(1, 2) + 0 + F(250, 404) + 1) / 4,
      ("strict", "dataset"): (F(1, 2) + 0 + F(154, 404) + 1) / 4,
      ("half", "leaderboard"): (F(3, 4) + 0 + F(327, 404) + 1) / 4,
      ("fractional", "leaderboard"): (F(3, 4) + 0 + F(327, 404) + 1) / 4}


@pytest.mark.parametrize("policy,counts", list(RB))
def test_rewardbench(policy, counts):
    report = run("rewardbench", load("rewardbench.jsonl", "rewardbench"), policy, counts=counts)
    row = report["methods"]["Greedy"]
    exact(row["sections"]["Overall"], RB[policy, counts])
    exact(row["sections"]["Chat"], F(1, 2) if policy == "strict" else F(3, 4))
    exact(row["tie_rate"], F(2, 6))
    exact(row["accuracy"], F(3, 6) if policy == "strict" else F(4, 6))
    assert row["headline"]["RewardBench"][1] == row["tie_rate"]


# PPE-Pref: q1 win, q2 loss, q3 and q4 two-way ties -> strict 1/4, half 2/4; tie rate 2/4.
# PPE-Correct: pairs c1:0-1 win, c1:1-2 tie (best = 1), c2:0-1 loss (best = 1), c3:0-1 win, c3:0-2 tie.
#   domains strict: math 1/2, gpqa 0, mmlu-pro 1/2 -> mean 1/3; half: 3/4, 0, 3/4 -> mean 1/2; tie rate 2/5.
@pytest.mark.parametrize("policy,pref,correct", [("strict", F(1, 4), F(1, 3)), ("half", F(1, 2), F(1, 2)),
                                                 ("fractional", F(1, 2), F(1, 2))])
def test_ppe(policy, pref, correct):
    examples = load("ppe_preference.jsonl", "ppe") + load("ppe_correctness.jsonl", "ppe")
    assert [e.best for e in examples if e.kind == "ppe-correctness"] == [0, 1, 1, 0, 0]
    row = run("ppe", examples, policy)["methods"]["Greedy"]
    exact(row["preference"]["accuracy"], pref)
    exact(row["correctness"]["accuracy"], correct)
    assert set(row["correctness"]["domains"]) == {"math", "gpqa", "mmlu-pro"}
    exact(row["preference"]["tie_rate"], F(2, 4))
    exact(row["correctness"]["tie_rate"], F(2, 5))


# RMB cells: helpfulness/pairwise p1 win, p2 tie; harmlessness/pairwise p3 loss;
# helpfulness/bon b1 two-way tie at the top, b2 three-way tie; harmlessness/bon b3 strict win.
#   strict: 1/2, 0, 0, 1 -> 3/8;  half: 3/4, 1/2, 0, 1 -> 9/16;  fractional: 3/4, (1/2 + 1/3)/2 = 5/12, 0, 1 -> 13/24.
@pytest.mark.parametrize("policy,expected,help_bon", [("strict", F(3, 8), 0), ("half", F(9, 16), F(1, 2)),
                                                      ("fractional", F(13, 24), F(5, 12))])
def test_rmb(policy, expected, help_bon):
    examples = load("rmb_pairwise.json", "rmb") + load("rmb_bon.json", "rmb")
    row = run("rmb", examples, policy)["methods"]["Greedy"]
    exact(row["score"], expected)
    exact(row["cells"]["helpfulness/bon"]["accuracy"], help_bon)
    exact(row["cells"]["harmlessness/bon"]["accuracy"], 1)
    exact(row["tie_rate"], F(3, 6))
    partial = run("rmb", examples[:3], policy)["methods"]["Greedy"]  # pairwise only: no RMB number
    assert math.isnan(partial["score"])


# Overall (strict) = mean(RewardBench 0.5 + 0 + 250/404 + 1 over 4, PPE-Pref 1/4, PPE-Correct 1/3, RMB 3/8).
def test_overall_from_a_suite_file():
    specs = parse_data_specs(None, os.path.join(GOLDEN, "suite.txt"), "jsonl")
    assert [fmt for _, fmt in specs] == ["rewardbench", "ppe", "ppe", "rmb", "rmb"]
    groups = {}
    for path, fmt in specs:
        groups.setdefault(fmt, []).extend(load_examples(path, format=fmt))
    reports = {fmt: run(fmt, examples, "strict") for fmt, examples in groups.items()}
    summary = summarize(reports)["Greedy"]
    exact(summary["Overall"], (RB["strict", "leaderboard"] + F(1, 4) + F(1, 3) + F(3, 8)) / 4)
    exact(summary["ties"]["PPE-Correct"], F(2, 5))
    printed = format_report(reports, summarize(reports), tie_policy="strict", seed=0)
    for needle in ("Overall", "RewardBench     ties", "PPE-Correct     ties", "allenai leaderboard constants",
                   "helpfulness/bon", "mmlu-pro"):
        assert needle in printed, needle
    del reports["rmb"]  # three of the four: no Overall
    assert "Overall" not in summarize(reports)["Greedy"]


# ReaLMistake, label 1 = no error. Greedy scores m1..m5: 8, 3, 5, 5, unparsed. Positives {8, 5}, negatives {3, 5}:
#   8>3, 8>5, 5>3 win, 5=5 half -> 3.5 / 4 = 7/8; m5 left out. Voting@2 sums: 16, 7, 9 (one sample parsed),
#   10, none: ranked by the parsed samples' mean 8, 3.5, 9, 5 -> every positive above every negative: 1.
def test_realmistake_auc_greedy_and_summed_samples():
    examples = load("realmistake.jsonl", "realmistake")
    assert [e.label for e in examples] == [1, 0, 1, 0, 0] and examples[4].id.startswith("rm-")
    greedy = run("realmistake", examples, "random", rows=[[8], [3], [5], [5], [NAN]])["methods"]["Greedy"]
    exact(greedy["auc"], F(7, 8))
    assert greedy["unscored"] == 1
    voting = run("realmistake", examples, "random", rows=[[16], [7], [9], [10], [NAN]], used=[2, 2, 1, 2, 0])
    exact(voting["methods"]["Greedy"]["auc"], 1)


# ours: j1 best 2 shares the top with response 1 (strict 0, half and fractional 1/2); j2 best 0 (from scores) wins.
@pytest.mark.parametrize("policy,expected", [("strict", F(1, 2)), ("half", F(3, 4)), ("fractional", F(3, 4))])
def test_our_jsonl(policy, expected):
    row = run("jsonl", load("ours.jsonl", "jsonl"), policy)["methods"]["Greedy"]
    exact(row["accuracy"], expected)
    exact(row["tie_rate"], F(1, 2))


def test_random_tie_break_is_between_strict_and_strict_plus_ties_and_seeded():
    examples = load("rmb_pairwise.json", "rmb") + load("rmb_bon.json", "rmb")
    strict = run("rmb", examples, "strict")["methods"]["Greedy"]["accuracy"]
    values = set()
    for seed in range(40):
        votes = {"Greedy": {"rows": [PREDICTIONS[e.id] for e in examples], "used": [1] * 6}}
        value = benchmark_methods("rmb", examples, votes, tie_policy="random", seed=seed)["Greedy"]["accuracy"]
        assert strict <= value <= strict + 3 / 6 + 1e-12
        values.add(value)
    assert len(values) > 1  # the draws matter; the same seed gives the same draws
    again = benchmark_methods("rmb", examples, votes, tie_policy="random", seed=39)["Greedy"]["accuracy"]
    assert again == value


def test_data_specs_are_checked(tmp_path):
    assert parse_data_specs(["a.jsonl:rewardbench", "b.jsonl"], None, "ppe") == [("a.jsonl", "rewardbench"),
                                                                                   ("b.jsonl", "ppe")]
    for values, needle in ((["a.jsonl:nope"], "unknown format 'nope'"), (["a:rmb", "a:rmb"], "given twice"),
                           ([], "no data")):
        with pytest.raises(ValueError, match=needle):
            parse_data_specs(values, None, "jsonl")
