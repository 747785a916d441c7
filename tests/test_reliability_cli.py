"""`score` and `eval` never destroy a user's file and never mix two runs (issue 16, faults 1 and 2): an --out that
is not our results file is refused and left byte for byte as it was; output paths are checked before any model
loads; the sidecar FILE.meta.json records the run and a resume that differs is refused naming the fields; a
second command on the same --out is refused while the first writes; eval keeps earlier results unless --overwrite.
Real files and a real tiny random-init Llama with a tokenizer trained here."""
import json
import os

import pytest
import torch

from grm_engine import cli
from grm_engine.demo import build_tokenizer, make_examples, tiny_config, write_jsonl
from grm_engine.grm import GRM

FAST = ["--k", "1", "--max-tokens", "2", "--max-num-seqs", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two tiny random-init Llama checkpoints over one tokenizer (two different --model folders)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("reliability_cli")
    tokenizer = build_tokenizer(root / "tokenizer")
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        tf.LlamaForCausalLM(tiny_config("llama", tokenizer)).save_pretrained(root / f"model{seed}")
        tokenizer.save_pretrained(root / f"model{seed}")
        dirs.append(str(root / f"model{seed}"))
    return dirs


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(GRM, "from_pretrained", refuse)


def score(model, data, out, *extra):
    return cli.main(["score", "--model", model, "--data", str(data), "--out", str(out), *FAST, *extra])


@pytest.mark.parametrize("content", [b'{"note": "a one-line JSON without newline"}', b"my notes\nsecond line",
                                     b'{"id": 1, "query": "q"}\n', b"", b"\n\n"])
def test_an_existing_file_that_is_not_ours_is_refused_untouched(model_dirs, tmp_path, capsys, no_model_loading,
                                                                 content):
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(2))
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    before = os.stat(out)
    assert score(model_dirs[0], data, out) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(out) in err
    assert out.read_bytes() == content and os.stat(out).st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl", "notes.txt"]  # no sidecar, no temp files


def test_out_naming_the_data_file_is_refused_untouched(model_dirs, tmp_path, capsys, no_model_loading):
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(3))
    text = open(data, "rb").read()
    assert score(model_dirs[0], data, data) == 2
    assert "is the --data file" in capsys.readouterr().err
    assert open(data, "rb").read() == text


def test_bad_output_paths_fail_before_the_model_loads(model_dirs, tmp_path, capsys, no_model_loading):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = write_jsonl(data_dir / "a.jsonl", make_examples(2))
    cases = [(tmp_path, "is a directory"),
             (tmp_path / "missing" / "out.jsonl", "does not exist"),
             (data_dir / "out.jsonl", "inside the --data folder")]
    if os.path.isdir("/proc/self"):  # a folder nobody can create files in (root included)
        cases.append(("/proc/self/out.jsonl", "cannot write"))
    for out, needle in cases:
        assert score(model_dirs[0], data_dir if "inside" in needle else data, out) == 2, out
        err = capsys.readouterr().err
        assert needle in err, (out, err)
    ev = ["eval", "--model", model_dirs[0], "--data", data, *FAST]
    assert cli.main([*ev, "--out-dir", data]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_the_sidecar_records_the_run_and_a_different_resume_is_refused(model_dirs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(3))
    other_data = write_jsonl(tmp_path / "other.jsonl", make_examples(3))
    out = tmp_path / "results.jsonl"
    # an interrupted first run: one row written
    assert score(model_dirs[0], data, out, "--chunk-size", "1") == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0])
    sidecar = json.loads((tmp_path / "results.jsonl.meta.json").read_text())
    assert sidecar["run"]["model"] == os.path.abspath(model_dirs[0])
    assert sidecar["run"]["data"] == os.path.abspath(data) and sidecar["run"]["k"] == 1
    capsys.readouterr()
    base = {"--model": model_dirs[0], "--data": data, "--seed": "0", "--temperature": "0.5"}
    for change, needles in [({"--model": model_dirs[1]}, ["model: ", model_dirs[1]]),
                            ({"--data": other_data}, ["data: ", "other.jsonl"]),
                            ({"--seed": "3"}, ["seed: 0 in the file, 3 now"]),
                            ({"--temperature": "0.7"}, ["temperature: 0.5 in the file, 0.7 now"])]:
        options = {**base, **change}
        argv = ["score", *[part for pair in options.items() for part in pair], "--out", str(out), *FAST,
                "--chunk-size", "1"]
        assert cli.main(argv) == 2, change
        err = capsys.readouterr().err
        assert "another run" in err and "use the same options to resume" in err
        for needle in needles:
            assert needle in err, (change, err)
        assert out.read_text() == lines[0]
    # the same run resumes and completes the file as an uninterrupted run wrote it
    assert score(model_dirs[0], data, out, "--chunk-size", "1") == 0
    assert out.read_text() == "".join(lines)


def test_a_second_command_on_the_same_out_is_refused_while_the_first_writes(model_dirs, tmp_path, capsys,
                                                                           monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(4))
    out = tmp_path / "results.jsonl"
    argv = ["score", "--model", model_dirs[0], "--data", str(data), "--out", str(out), *FAST, "--chunk-size", "2"]
    original = GRM.score
    second = []

    def score_and_start_another(self, *args, **kwargs):
        if not second:  # the same command, started while the first holds the file
            second.append(cli.main(argv))
            second.append(capsys.readouterr().err)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(GRM, "score", score_and_start_another)
    assert cli.main(argv) == 0
    assert second[0] == 2 and "another grm-engine score is writing" in second[1]
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == ["ex0", "ex1", "ex2", "ex3"]  # each once
    monkeypatch.setattr(GRM, "score", original)
    assert cli.main(argv) == 0  # the lock went with the first command


def test_eval_keeps_earlier_results_unless_overwrite(model_dirs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(2))
    ev = ["eval", "--model", model_dirs[0], "--data", data, *FAST, "--out-dir", str(tmp_path / "eval")]
    assert cli.main(ev) == 0
    results = tmp_path / "eval" / "results.json"
    results.write_text('{"kept": true}')
    samples = (tmp_path / "eval" / "samples.jsonl").read_bytes()
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GRM, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
        assert cli.main(ev) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "results.json" in err
    assert results.read_text() == '{"kept": true}' and (tmp_path / "eval" / "samples.jsonl").read_bytes() == samples
    assert cli.main([*ev, "--overwrite"]) == 0
    assert json.loads(results.read_text())["model"] == model_dirs[0]
