"""Kill and resume (issue 16): `score`, `eval` and `train sft` interrupted by SIGINT, SIGKILL or a write cut by a
file-size limit (RLIMIT_FSIZE: the write that crosses it is cut short and fails with EFBIG; Python ignores SIGXFSZ)
and then rerun with the same command: nothing lost, nothing duplicated, the results equal to an uninterrupted run's,
never a traceback (eval writes samples.jsonl before results.json, so a cut leaves no output and the same command
reruns). The interrupted run is a real subprocess, slowed down (a sleep before each chunk or step) only so
that a signal lands mid-run; the peer and the rerun run in this process with the same single thread."""
import json
import os

import pytest

from grm_engine.demo import make_examples, write_jsonl

from reliability_helpers import cli_outcome, interrupt, lines_of, slow_cli, tiny_checkpoint
from train_helpers import few_threads, subprocess_env  # noqa: F401 (autouse: one thread, as in the subprocess)

SCORE = ["--k", "2", "--max-tokens", "3", "--device", "cpu", "--chunk-size", "1", "--temperature", "0.7"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("resume_model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("resume_data") / "data.jsonl", make_examples(5))


def check_interrupted(done, how):
    """The interrupted process ended the way its interruption says, with a message and no traceback."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    expected = {"SIGINT": 130, "SIGKILL": -9, "EFBIG": 1}[how]
    assert done.returncode == expected, (how, done.returncode, done.stderr[-2000:])
    if how == "SIGINT":
        assert "rerun the same command" in done.stderr, done.stderr[-2000:]
    if how == "EFBIG":
        assert "error:" in done.stderr and ("File too large" in done.stderr or "cannot write" in done.stderr), \
            done.stderr[-2000:]


def run_here(argv, capsys):
    code, err = cli_outcome(argv, capsys)
    assert code == 0, err[-3000:]


@pytest.fixture
def score_peer(model, data, tmp_path_factory, capsys):
    if "score" not in PEERS:
        out = tmp_path_factory.mktemp("score_peer") / "out.jsonl"
        run_here(["score", "--model", model, "--data", data, "--out", str(out), *SCORE], capsys)
        PEERS["score"] = out.read_text()
    return PEERS["score"]


PEERS: dict = {}


@pytest.mark.parametrize("how", ["EFBIG"])  # SIGINT and a cut line: tests/test_cli.py; SIGKILL ends as eval's
def test_score_resumes_after_an_interruption(model, data, score_peer, tmp_path, capsys, how):
    out = tmp_path / "out.jsonl"
    argv = ["score", "--model", model, "--data", data, "--out", str(out), *SCORE]
    rows = score_peer.splitlines(keepends=True)
    limit = len("".join(rows[:2]).encode()) + len(rows[2].encode()) // 2  # the cut falls inside row 3
    done = interrupt(slow_cli("grm_engine.grm:GRM.score", 0.4, *argv), how, after_calls=2,
                     marks_file=tmp_path / "marks", limit_bytes=limit, env=subprocess_env())
    check_interrupted(done, how)
    written = lines_of(out)
    assert 2 <= len(written) < len(rows) and score_peer.startswith("".join(written)), written
    run_here(argv, capsys)
    assert out.read_text() == score_peer  # nothing lost, nothing twice, the same samples


# ---- eval ----
EVAL = ["--k", "1,2", "--max-tokens", "3", "--device", "cpu", "--chunk-size", "1", "--tie-policy", "strict"]


def eval_outputs(out_dir) -> tuple[dict, str]:
    """results.json without what depends on the clock, and samples.jsonl."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("seconds", "tokens_per_second")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    with open(os.path.join(out_dir, "results.json")) as f:
        results = strip(json.load(f))
    with open(os.path.join(out_dir, "samples.jsonl")) as f:
        return results, f.read()


@pytest.fixture
def eval_peer(model, data, tmp_path_factory, capsys):
    pytest.importorskip("matplotlib")
    if "eval" not in PEERS:
        out_dir = tmp_path_factory.mktemp("eval_peer") / "eval"
        run_here(["eval", "--model", model, "--data", data, "--out-dir", str(out_dir), *EVAL], capsys)
        PEERS["eval"] = eval_outputs(out_dir)
    return PEERS["eval"]


@pytest.mark.parametrize("how", ["SIGKILL", "EFBIG"])  # SIGINT ends as SIGKILL does (nothing written yet)
def test_eval_reruns_after_an_interruption(model, data, eval_peer, tmp_path, capsys, how):
    out_dir = tmp_path / "eval"
    argv = ["eval", "--model", model, "--data", data, "--out-dir", str(out_dir), *EVAL]
    # signals land in the sampled pass (5 greedy chunks, then 5 sampled ones); the size limit cuts samples.jsonl
    done = interrupt(slow_cli("grm_engine.grm:GRM.score", 0.2, *argv), how, after_calls=7,
                     marks_file=tmp_path / "marks", limit_bytes=len(eval_peer[1].encode()) // 2, env=subprocess_env())
    check_interrupted(done, how)
    if how != "SIGKILL":  # a killed process cannot remove its temp file; an interrupted or failed one does
        assert not [n for n in os.listdir(out_dir) if n.startswith(".grm-engine-")]
    assert not (out_dir / "results.json").exists()  # samples.jsonl comes first: its cut leaves no output
    code, err = cli_outcome(argv, capsys)  # the same command, no --overwrite needed
    assert code == 0, err[-3000:]
    assert eval_outputs(out_dir) == eval_peer


# ---- train sft ----
STEPS = 6


@pytest.fixture
def sft_peer(tmp_path_factory):
    """A tiny base model, its SFT data and an uninterrupted run of STEPS steps (built once per module)."""
    from grm_engine.train import train

    from train_helpers import build_base, sft_settings, write_sft_data

    if "sft" not in PEERS:
        root = tmp_path_factory.mktemp("resume_sft")
        base, data = build_base(root), write_sft_data(root / "sft.jsonl", count=24, seed=2)
        train("sft", sft_settings(base, data, root / "peer", max_steps=STEPS), log=lambda *a: None)
        PEERS["sft"] = (base, data, root / "peer")
    return PEERS["sft"]


def largest_checkpoint_file(run) -> int:
    checkpoint = os.path.join(run, "checkpoint-2")
    return max(os.path.getsize(os.path.join(checkpoint, name)) for name in os.listdir(checkpoint))


@pytest.mark.parametrize("how", ["SIGINT", "EFBIG"])
def test_train_sft_resumes_after_an_interruption(sft_peer, tmp_path, capsys, how):
    from test_train_checkpoint import assert_same_steps, assert_same_weights, metrics_by_step
    from train_helpers import flags, sft_settings

    base, data, peer = sft_peer
    out = tmp_path / "run"
    argv = ["train", "sft", *flags(sft_settings(base, data, out, max_steps=STEPS))]
    # SIGINT after 3 steps (checkpoint-2 saved); the size limit cuts the largest file of the first checkpoint
    done = interrupt(slow_cli("grm_engine.train.engine:Engine.step", 0.3, *argv), how, after_calls=3,
                     marks_file=tmp_path / "marks", limit_bytes=largest_checkpoint_file(peer) // 2,
                     env=subprocess_env())
    check_interrupted(done, how)
    assert not (out / "final").exists()
    code, err = cli_outcome(argv, capsys)
    assert code == 0, err[-3000:]
    assert sorted(metrics_by_step(out)) == list(range(1, STEPS + 1))  # each step once
    assert_same_steps(out, peer, range(1, STEPS + 1))
    assert_same_weights(out / "final", peer / "final")
