"""`grm-engine eval` over several benchmarks at once (the golden suite + ReaLMistake) with the overfit model of
test_grm.py, whose critique gives 9 to the response shown first and 2 to the other: every number in results.json
is recomputed here from that rule; and the template's content guards a `score` resume."""
import json
import os

import pytest

from grm_engine import cli
from grm_engine.data import load_examples
from grm_engine.grm import GRM
from grm_engine.metrics import REWARDBENCH_LEADERBOARD_COUNTS, REWARDBENCH_SECTIONS
from test_grm import build_models, expected_totals

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
SMALL = ["--max-tokens", "16", "--max-num-seqs", "64"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("grm_models"))


def half_credit(totals, best):
    """The half policy restated: 1 for a strict win, 1/2 for a tie at the top, 0 otherwise or unscored."""
    if totals is None:
        return 0.0
    other = max(v for i, v in enumerate(totals) if i != best)
    return 1.0 if totals[best] > other else 0.5 if totals[best] == other else 0.0


def mean(values):
    return sum(values) / len(values)


def expected_scores(k):
    """RewardBench, PPE-Pref, PPE-Correct, RMB under the half policy, by the paper's rules, for the first k samples."""
    def credits(name, fmt):
        examples = load_examples(os.path.join(GOLDEN, name), format=fmt)
        return [(e, half_credit(expected_totals(e, k, 0), e.best)) for e in examples]
    rb = credits("rewardbench.jsonl", "rewardbench")
    subsets = {}
    for e, c in rb:
        subsets.setdefault(e.subset, []).append(c)
    sections = []
    for names in REWARDBENCH_SECTIONS.values():
        present = [s for s in names if s in subsets]
        sections.append(sum(mean(subsets[s]) * REWARDBENCH_LEADERBOARD_COUNTS[s] for s in present)
                        / sum(REWARDBENCH_LEADERBOARD_COUNTS[s] for s in present))
    domains = {}
    for e, c in credits("ppe_correctness.jsonl", "ppe"):
        domains.setdefault(e.subset, []).append(c)
    cells = {}
    for name in ("rmb_pairwise.json", "rmb_bon.json"):
        for e, c in credits(name, "rmb"):
            cells.setdefault(("Help" in e.subset, "BoN" in e.subset), []).append(c)
    return {"RewardBench": mean(sections), "PPE-Pref": mean([c for _, c in credits("ppe_preference.jsonl", "ppe")]),
            "PPE-Correct": mean([mean(v) for v in domains.values()]), "RMB": mean([mean(v) for v in cells.values()])}


def test_eval_of_the_paper_suite_and_realmistake(models, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    argv = ["eval", "--model", models["overfit"], "--suite", os.path.join(GOLDEN, "suite.txt"),
            "--data", os.path.join(GOLDEN, "realmistake.jsonl") + ":realmistake", "--k", "1,2",
            "--tie-policy", "half", "--out-dir", str(out_dir), *SMALL]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    for needle in ("tie policy: half", "allenai leaderboard constants", "Overall", "ties", "ROC-AUC", "mmlu-pro"):
        assert needle in printed, needle
    report = json.loads((out_dir / "results.json").read_text())
    assert set(report["benchmarks"]) == {"rewardbench", "ppe", "rmb", "realmistake"}
    assert report["rewardbench_counts"] == "leaderboard" and report["template"] == "default"
    for method, k in (("Greedy", 1), ("Voting@1", 1), ("Voting@2", 2)):
        summary, expected = report["summary"][method], expected_scores(k)
        for column, value in expected.items():
            assert summary[column] == pytest.approx(value), (method, column)
        assert summary["Overall"] == pytest.approx(mean(list(expected.values())))
        # the one-response rows cannot be parsed from this model's two-score critique: all unscored, no AUC
        realmistake = report["benchmarks"]["realmistake"]["methods"][method]
        assert realmistake["auc"] is None and realmistake["unscored"] == 5
    ties = sum(expected_totals(e, 2, 0) is not None and len(set(expected_totals(e, 2, 0))) == 1
               for e in load_examples(os.path.join(GOLDEN, "rewardbench.jsonl"), format="rewardbench"))
    assert report["summary"]["Voting@2"]["ties"]["RewardBench"] == pytest.approx(ties / 6)
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    # --data entries first, then the suite's lines
    assert [r["benchmark"] for r in rows] == ["realmistake"] * 5 + ["rewardbench"] * 6 + ["ppe"] * 9 + ["rmb"] * 6


def test_eval_defaults_are_the_papers_protocol():
    args = cli.build_parser().parse_args(["eval", "--model", "m", "--data", "d"])
    assert args.tie_policy == "random" and args.rewardbench_counts == "leaderboard"


def test_a_score_resume_under_another_template_is_refused(models, tmp_path, capsys):
    template = tmp_path / "mine.txt"
    with open(os.path.join(os.path.dirname(cli.__file__), "prompt_templates", "default.txt")) as f:
        template.write_text(f.read())  # the same prompts, so the overfit model answers as usual
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--model", models["overfit"], "--data", os.path.join(GOLDEN, "rewardbench.jsonl"),
            "--format", "rewardbench", "--k", "1", "--template", str(template), "--out", str(out), *SMALL]
    assert cli.main(argv) == 0
    sidecar = json.loads((tmp_path / "scores.jsonl.meta.json").read_text())
    assert len(sidecar["run"]["template_sha256"]) == 64
    template.write_text(template.read_text() + "\n# edited\n")  # same path, other content
    before = out.read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert "template_sha256" in capsys.readouterr().err and out.read_bytes() == before


def test_a_bad_template_is_refused_before_any_model_loads(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(GRM, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    bad = tmp_path / "bad.txt"
    bad.write_text('response = "{{response}}"\nresponse_separator = ""\nhint = "{{best}}"\n'
                   "=== grm ===\n{{query}} {{responses}} {{answer}}\n=== single ===\n{{query}} {{responses}}\n"
                   "=== meta ===\n{{query}} {{responses}}\n")
    argv = ["eval", "--model", models["overfit"], "--data", os.path.join(GOLDEN, "ours.jsonl"),
            "--template", str(bad), "--out-dir", str(tmp_path / "e")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "{{answer}}" in err
