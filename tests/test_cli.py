"""`grm-engine score` and `grm-engine eval` end to end on the CPU (models from test_grm.py's builder)."""
import json
import subprocess
import sys

import pytest

from grm_engine import cli
from grm_engine.grm import GRM, sample_permutation
from grm_engine.demo import make_examples, sentence, write_jsonl
from test_grm import build_models

SMALL = ["--max-tokens", "16", "--max-num-seqs", "64"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("grm_models"))


def write_rewardbench(path, count: int):
    import random

    rng = random.Random(9)
    subsets = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "hep-python"]
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"id": i, "prompt": sentence(rng), "chosen": sentence(rng), "rejected": sentence(rng),
                                "subset": subsets[i % 4]}) + "\n")
    return str(path)


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_score_writes_schema_and_resumes_after_a_cut(models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(7, three_every=3))
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    common = ["score", "--model", models["overfit"], "--data", data, "--k", "3", "--chunk-size", "3", *SMALL]
    assert cli.main([*common, "--out", str(full)]) == 0
    rows = read_lines(full)
    assert [r["id"] for r in rows] == [f"ex{i}" for i in range(7)]
    for row in rows:
        assert set(row) == {"id", "totals", "best", "label_best", "samples", "settings"}
        assert len(row["samples"]) == 3
        for j, sample in enumerate(row["samples"]):
            assert set(sample) == {"text", "permutation", "scores", "status", "meta", "voted", "num_tokens",
                                   "finish_reason"}
            n = len(row["totals"])
            assert sample["permutation"] == sample_permutation(0, row["id"], j, n, True)
            assert sample["status"] == ("OK" if n == 2 else "WRONG_COUNT")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["parse_failures"]["WRONG_COUNT"] == 2 * 3 and summary["examples"] == 7

    # an interrupted run: 4 whole lines (chunk 2 half written) and a partial fifth line
    text = full.read_text()
    lines = text.splitlines(keepends=True)
    cut.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    assert cli.main([*common, "--out", str(cut)]) == 0
    assert cut.read_text() == text  # the same samples an uninterrupted run writes
    assert "dropped a partial last line" in capsys.readouterr().err
    # complete: nothing to do, no model loaded
    assert cli.main([*common, "--out", str(cut)]) == 0
    assert cut.read_text() == text
    # other settings on the same file: refused
    assert cli.main([*common[:-len(SMALL)], "--max-tokens", "17", "--out", str(cut)]) == 2
    assert "use the same options to resume" in capsys.readouterr().err


def test_ctrl_c_leaves_whole_lines_and_resume_completes(models, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(6))
    common = ["score", "--model", models["overfit"], "--data", data, "--k", "2", "--chunk-size", "2", *SMALL]
    full, interrupted = tmp_path / "full.jsonl", tmp_path / "interrupted.jsonl"
    assert cli.main([*common, "--out", str(full)]) == 0
    score = GRM.score
    calls = []

    def interrupt_on_second_chunk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score(self, *args, **kwargs)
    monkeypatch.setattr(GRM, "score", interrupt_on_second_chunk)
    assert cli.main([*common, "--out", str(interrupted)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert [r["id"] for r in read_lines(interrupted)] == ["ex0", "ex1"]
    monkeypatch.setattr(GRM, "score", score)
    assert cli.main([*common, "--out", str(interrupted)]) == 0
    assert interrupted.read_text() == full.read_text()


def test_errors_before_any_model_is_loaded(models, tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(GRM, "from_pretrained", no_loading)
    good = write_jsonl(tmp_path / "good.jsonl", make_examples(2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "query": "q", "responses": ["a", "b"], "best": 0}\n'
                   '{"id": 2, "query": "q", "responses": ["a", 5], "best": 0}\n')
    out = str(tmp_path / "o.jsonl")
    empty, bert = tmp_path / "empty", tmp_path / "bert"
    empty.mkdir()
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    single = tmp_path / "single.jsonl"
    single.write_text('{"id": 1, "query": "q", "responses": ["a"], "label": 1}\n')
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "subset": "s", "id": 3}\n' * 2)
    cases = [
        (["score", "--model", models["overfit"], "--data", str(repeated), "--format", "rewardbench", "--out", out],
         ["line 2", "repeats the id at line 1"]),
        (["score", "--model", models["overfit"], "--data", str(bad), "--out", out], [str(bad), "line 2", "responses[1]"]),
        (["eval", "--model", models["overfit"], "--data", str(bad), "--format", "jsonl"], ["line 2", "responses[1]"]),
        (["score", "--model", str(empty), "--data", good, "--out", out], ["no config.json"]),
        (["score", "--model", str(bert), "--data", good, "--out", out], ["model_type 'bert' is not supported"]),
        (["score", "--model", str(tmp_path / "nope"), "--data", good, "--out", out], ["not a directory"]),
        (["score", "--model", models["overfit"], "--data", good, "--meta-rm", models["overfit"], "--out", out],
         ["meta RM", "neither a *ForSequenceClassification"]),
        (["score", "--model", models["overfit"], "--data", good, "--k-meta", "2", "--out", out], ["--k-meta needs --meta-rm"]),
        (["eval", "--model", models["overfit"], "--data", good, "--k", "1,x"], ["comma-separated integers"]),
        (["eval", "--model", models["overfit"], "--data", str(single), "--k", "1,4"], ["line 1", "only k=1"]),
        (["score", "--model", models["overfit"], "--data", str(tmp_path / "missing.jsonl"), "--out", out], ["does not exist"]),
    ]
    for argv, needles in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err
        for needle in needles:
            assert needle in err, (argv, err)


def test_eval_table_json_and_plot(models, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = write_rewardbench(tmp_path / "rb.jsonl", 8)
    out_dir = tmp_path / "eval"
    argv = ["eval", "--model", models["overfit"], "--data", data, "--format", "rewardbench", "--k", "1,2,4",
            "--meta-rm", models["meta"], "--out-dir", str(out_dir), "--tie-policy", "strict", *SMALL]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "tie policy: strict" in printed
    for name in ("Greedy", "Voting@1", "Voting@2", "Voting@4", "MetaRM@4", "Chat Hard", "Overall", "hep-python"):
        assert name in printed
    report = json.loads((out_dir / "results.json").read_text())
    assert (out_dir / "accuracy_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    samples = read_lines(out_dir / "samples.jsonl")
    assert len(samples) == 8 and all(len(s["samples"]) == 4 for s in samples)
    # the known answer: sample j gives 9 to the response it shows first; chosen (index 0) must win strictly
    for k in (1, 2, 4):
        wins = 0
        for row in samples:
            totals = [0, 0]
            for sample in row["samples"][:k]:
                totals[sample["permutation"][0]] += 9
                totals[sample["permutation"][1]] += 2
            wins += totals[0] > totals[1]
        assert report["methods"][f"Voting@{k}"]["accuracy"] == pytest.approx(wins / 8)
    greedy = sum(sample_permutation(0, str(i), 0, 2, True)[0] == 0 for i in range(8)) / 8
    assert report["methods"]["Greedy"]["accuracy"] == pytest.approx(greedy)
    assert report["methods"]["MetaRM@4"]["k_meta"] == 2
    assert set(report["methods"]["Voting@4"]["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning", "Overall"}
    assert report["sampled_run"]["parse_failures"] == {"NO_SCORES": 0, "WRONG_COUNT": 0, "OUT_OF_RANGE": 0}


def test_module_entry_point_lists_the_existing_commands():
    out = subprocess.run([sys.executable, "-m", "grm_engine", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "{score,eval,demo,train}" in out.stdout
    train = subprocess.run([sys.executable, "-m", "grm_engine", "train", "--help"], capture_output=True, text=True,
                           timeout=60)
    assert train.returncode == 0 and "sft" in train.stdout and "grpo" in train.stdout and "meta-rm" in train.stdout


@pytest.mark.gpu
def test_score_on_gpu_gives_the_known_statuses(models, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(12, three_every=3))
    out = tmp_path / "gpu.jsonl"
    argv = ["score", "--model", models["overfit"], "--data", data, "--k", "8", "--device", "cuda", "--dtype", "float32",
            "--chunk-size", "5", "--out", str(out), *SMALL]
    assert cli.main(argv) == 0
    for row in read_lines(out):
        n = len(row["totals"])
        assert [s["status"] for s in row["samples"]] == ["OK" if n == 2 else "WRONG_COUNT"] * 8
        if n == 2:
            totals = [0, 0]
            for s in row["samples"]:
                totals[s["permutation"][0]] += 9
                totals[s["permutation"][1]] += 2
            assert row["totals"] == totals
