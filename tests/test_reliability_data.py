"""Data edge cases through `score` (issue 16): each bad row is an error naming the file and line before any model
loads, and --skip-invalid skips it and says how many; a prompt longer than the checkpoint's context and a lone
surrogate are caught from the tokenizer and config.json alone; an --out anywhere in a --data folder is refused. The model load is replaced by an error where the test says no model may load."""
import json

import pytest

from grm_engine import cli
from grm_engine.demo import make_examples, write_jsonl
from grm_engine.grm import GRM

from reliability_helpers import cli_outcome, fingerprint, tiny_checkpoint
from test_fuzz_cli import CORRUPT

FAST = ["--k", "1", "--max-tokens", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("reliability_data"))


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(GRM, "from_pretrained", refuse)


def data_with(tmp_path, bad_line: bytes, count: int = 3):
    """count good rows with bad_line as line 2."""
    lines = [json.dumps({"id": e.id, "query": e.query, "responses": e.responses, "best": e.best}).encode()
             for e in make_examples(count)]
    lines.insert(1, bad_line)
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


LONG_QUERY = json.dumps({"id": "long", "query": "word " * 3000, "responses": ["a", "b"], "best": 0}).encode()
BAD_ROWS = {**CORRUPT, "prompt longer than the context": LONG_QUERY}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_a_bad_row_is_named_before_loading_and_skip_invalid_skips_it(model, tmp_path, capsys, no_model_loading, kind):
    data = data_with(tmp_path, BAD_ROWS[kind])
    out = tmp_path / "out.jsonl"
    before = fingerprint(tmp_path)
    code, err = cli_outcome(["score", "--model", model, "--data", data, "--out", str(out), *FAST], capsys)
    assert code == 2 and "error:" in err, (kind, code, err)
    assert f"{data}, line 2" in err, err
    assert fingerprint(tmp_path) == before
    # with --skip-invalid: the three good rows reach the model, the bad one is counted
    seen = []

    def loaded(*args, **kwargs):
        seen.append(True)
        raise KeyboardInterrupt  # stop at the load: the checks are what this test is about
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GRM, "from_pretrained", loaded)
        code, err = cli_outcome(["score", "--model", model, "--data", data, "--out", str(out), *FAST,
                                 "--skip-invalid"], capsys)
    assert code == 130 and seen, (kind, code, err)
    assert "skipped 1 " in err and "line 2" in err and "3 to score" in err, err


def test_a_bom_on_line_1_is_accepted(model, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, make_examples(2))
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    out = tmp_path / "out.jsonl"
    code, err = cli_outcome(["score", "--model", model, "--data", str(data), "--out", str(out), *FAST], capsys)
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["ex0", "ex1"]


def test_out_anywhere_in_the_data_folder_is_refused_and_upper_case_suffixes_are_read(model, tmp_path, capsys):
    folder = tmp_path / "data"
    (folder / "results").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", make_examples(2))
    write_jsonl(folder / "B.JSONL", [e for e in make_examples(4)[2:]])
    for out in (folder / "out.jsonl", folder / "results" / "out.jsonl"):  # the next run would read it as data
        code, err = cli_outcome(["score", "--model", model, "--data", str(folder), "--out", str(out), *FAST], capsys)
        assert code == 2 and "inside the --data folder" in err, err
        assert not out.exists()
    out = tmp_path / "out.jsonl"
    argv = ["score", "--model", model, "--data", str(folder), "--out", str(out), *FAST, "--chunk-size", "1"]
    assert cli_outcome(argv, capsys)[0] == 0
    text = out.read_text()
    assert [json.loads(line)["id"] for line in text.splitlines()] == ["ex2", "ex3", "ex0", "ex1"]  # B.JSONL sorts first
    code, err = cli_outcome(argv, capsys)  # the rerun reads the same four examples and has nothing left to do
    assert code == 0 and "4 already in" in err, err
    assert out.read_text() == text


def test_options_the_decoder_would_reject_fail_before_loading(model, tmp_path, capsys, no_model_loading):
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(2))
    base = ["score", "--model", model, "--data", data, "--out", str(tmp_path / "out.jsonl"), "--device", "cpu"]
    import torch

    cases = [(["--temperature", "nan"], "--temperature nan"), (["--temperature", "inf"], "--temperature inf"),
             (["--kv-cache-memory-fraction", "0"], "--kv-cache-memory-fraction 0.0"),
             (["--max-num-seqs", "0"], "--max-num-seqs 0"),
             (["--k", "9", "--max-num-seqs", "8"], "--k 9 is above --max-num-seqs 8"),
             (["--k", "2", "--k-meta", "1"], "--k-meta needs --meta-rm")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for extra, needle in cases:
        code, err = cli_outcome([*base, *extra], capsys)
        assert code == 2 and needle in err, (extra, err)
    assert not (tmp_path / "out.jsonl").exists()


def test_k_above_the_default_max_num_seqs_raises_it(model, tmp_path, capsys, monkeypatch):
    """A user who asks for 300 critiques and says nothing about --max-num-seqs gets them decoded together."""
    data = write_jsonl(tmp_path / "data.jsonl", make_examples(1))
    seen = {}

    def loaded(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(GRM, "from_pretrained", loaded)
    assert cli.main(["score", "--model", model, "--data", data, "--out", str(tmp_path / "o.jsonl"), "--k", "300",
                     "--device", "cpu"]) == 130
    assert seen["max_num_seqs"] == 300
