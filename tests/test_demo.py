"""`grm-engine demo` (grm_engine/demo.py): the real pipeline (sft -> rft -> grpo -> meta-rm -> eval) at the test
preset's size, run once for the module through the CLI, then its outputs checked: the files a user is told about,
the mechanism the demo exists to show (after SFT, voting over sampled principles beats the greedy critique, which
picks one check and mostly ties), and `grm-engine score` on the trained GRM with the trained meta RM.

The test preset is small (about a minute on 2 CPU cores); its margins are ones it reaches with room to spare,
not the default preset's targets (the full table is in the demo's report)."""
import json

import pytest

from grm_engine import cli
from grm_engine.demo import DEMO_PRESETS, MARKER, DemoError, prepare_out_dir

STAGES = ("sft", "rft", "grpo")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "grm_demo"
    assert cli.main(["demo", "--preset", "test", "--out-dir", str(root), "--device", "cpu"]) == 0
    return root, json.loads((root / MARKER).read_text())


def test_demo_writes_every_stage_and_the_report(demo):
    root, summary = demo
    assert summary["status"] == "done"
    for stage in (*STAGES, "meta_rm"):
        assert (root / stage / "final" / "config.json").is_file()
        assert list((root / stage / "final").glob("*.safetensors"))
    assert (root / "rft" / "rft_samples.jsonl").is_file() and (root / "accuracy_vs_k.png").stat().st_size > 1000
    ks = DEMO_PRESETS["test"].ks
    for stage in STAGES:
        report = json.loads((root / "eval" / stage / "results.json").read_text())
        assert report["meta_rm"] == str(root / "meta_rm" / "final")
        assert set(report["methods"]) == {"Greedy", *(f"{m}@{k}" for m in ("Voting", "MetaRM") for k in ks)}
        # the table is eval's numbers, and the greedy rerun that gives the tie rate reproduces eval's greedy run
        assert summary["table"][stage]["Voting@8"] == report["methods"]["Voting@8"]["accuracy"]
        assert summary["critiques"][stage]["strict"] == pytest.approx(report["methods"]["Greedy"]["accuracy"])
        for method, accuracy in summary["table"][stage].items():
            assert 0 <= accuracy + summary["ties"][stage][method] <= 1 + 1e-9
        assert isinstance(summary["critiques"][stage]["critique"], str)
    assert summary["times"]["total"] > 0 and set(summary["times"]) >= {"sft", "rft", "grpo", "meta_rm"}


def test_after_sft_voting_beats_the_greedy_critique(demo):
    _, summary = demo
    sft = summary["table"]["sft"]
    # greedy runs one principle, which separates only one error type in three, and otherwise ties
    assert summary["ties"]["sft"]["Greedy"] >= 0.4
    assert sft["Voting@8"] >= sft["Greedy"] + 0.1


def test_score_works_on_the_demo_model(demo, tmp_path):
    root, _ = demo
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--model", str(root / "grpo" / "final"), "--meta-rm", str(root / "meta_rm" / "final"),
            "--data", str(root / "data" / "test.jsonl"), "--k", "4", "--max-tokens", "48", "--device", "cpu",
            "--out", str(out)]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == DEMO_PRESETS["test"].eval_examples
    statuses = [s["status"] for row in rows for s in row["samples"]]
    assert statuses.count("OK") >= 0.8 * len(statuses)
    assert all(s["meta"] is not None for row in rows for s in row["samples"] if s["status"] == "OK")


def test_out_dir_of_someone_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match="not written by"):
        prepare_out_dir(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"
