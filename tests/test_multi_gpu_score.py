"""Data-parallel `score` and `eval` (grm_engine/parallel.py) with 2-3 processes on the CPU (gloo): the merged
results file equals a one-process run's line for line (same order, the same samples: noise is keyed by the
example), a run killed at one world size resumes at another, a rank that raises stops every rank with its error
and no partial line, and eval's table and samples do not depend on the world size.

The model is a random-init 2-layer Qwen2 (train_helpers.build_base): its critiques are random text, which makes
any difference in a sample's noise visible. Multi-process runs are subprocesses under torchrun (directly, or
through --devices cpu,cpu); a wrapper script injects a failure into one rank's GRM.score."""
import json
import os
import sys

import pytest

from grm_engine import cli
from grm_engine.demo import make_examples, write_jsonl
from train_helpers import build_base, few_threads, run_cli, subprocess_env  # noqa: F401 (few_threads: autouse)

NUM_EXAMPLES, CHUNK = 10, 4  # chunks of 4, 4, 2: with 3 ranks the last chunk leaves one rank without examples
OPTIONS = ["--k", "3", "--chunk-size", str(CHUNK), "--max-tokens", "12", "--max-num-seqs", "32", "--temperature", "1.0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

# one rank's GRM.score fails at its Nth call (= its Nth chunk): it raises, or it kills its own process
WRAPPER = """
import os, signal, sys
from grm_engine import cli
from grm_engine.grm import GRM
mode, fail_rank, fail_call = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
score, calls = GRM.score, []
def failing(self, *args, **kwargs):
    calls.append(1)
    if int(os.environ["RANK"]) == fail_rank and len(calls) == fail_call:
        if mode == "raise":
            raise RuntimeError(f"injected failure on rank {fail_rank}")
        os.kill(os.getpid(), signal.SIGKILL)
    return score(self, *args, **kwargs)
GRM.score = failing
sys.exit(cli.main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_score")
    model = build_base(root)
    data = write_jsonl(root / "data.jsonl", make_examples(NUM_EXAMPLES, three_every=3))
    wrapper = root / "wrapper.py"
    wrapper.write_text(WRAPPER)
    common = ["score", "--model", model, "--data", data, *OPTIONS]
    reference = root / "one.jsonl"  # the one-process run, in this process
    assert cli.main([*common, "--device", "cpu", "--out", str(reference)]) == 0
    return {"root": root, "model": model, "data": data, "wrapper": str(wrapper), "common": common,
            "reference": reference.read_text()}


def score_argv(setup, out, device: str = "--device=cpu") -> list[str]:
    return [*setup["common"], device, "--out", str(out)]


def launched(setup, nproc: int, args: list[str], failure: tuple | None = None):
    """torchrun --nproc-per-node nproc: `-m grm_engine ARGS`, or the failing wrapper."""
    target = [setup["wrapper"], *map(str, failure)] if failure else ["-m", "grm_engine"]
    return run_cli([*target, *args], prefix=[*TORCHRUN, "--nproc-per-node", str(nproc)], env=subprocess_env(),
                   timeout=300)


def whole_lines(text: str) -> list[str]:
    assert text == "" or text.endswith("\n"), f"a partial last line: {text[-80:]!r}"
    return text.splitlines(keepends=True)


def test_two_ranks_write_the_one_process_file(setup, tmp_path):
    reference = setup["reference"]
    assert [json.loads(line)["id"] for line in reference.splitlines()] == [f"ex{i}" for i in range(NUM_EXAMPLES)]
    texts = {s["text"] for line in reference.splitlines() for s in json.loads(line)["samples"]}
    assert len(texts) > NUM_EXAMPLES * 2  # random critiques: mostly distinct samples, so a noise change would show
    out = tmp_path / "two.jsonl"
    done = run_cli(score_argv(setup, out, "--devices=cpu,cpu"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 ranks" in done.stderr
    assert out.read_text() == reference  # same order, same samples, same settings line by line
    with open(str(out) + ".meta.json") as f, open(str(setup["root"] / "one.jsonl.meta.json")) as g:
        two_run, one_run = json.load(f)["run"], json.load(g)["run"]
    assert two_run == one_run  # the sidecar records no world size: a resume at another one is accepted
    assert json.loads(done.stdout.strip().splitlines()[-1])["examples"] == NUM_EXAMPLES


def test_killed_at_two_ranks_resumes_at_one(setup, tmp_path):
    out = tmp_path / "killed.jsonl"
    done = launched(setup, 2, score_argv(setup, out), failure=("kill", 1, 2))  # rank 1 dies in the 2nd chunk
    assert done.returncode != 0
    lines = whole_lines(out.read_text())
    # the first chunk at most: the launcher's SIGTERM may reach rank 0 while it writes that chunk's lines
    assert len(lines) <= CHUNK and lines == whole_lines(setup["reference"])[:len(lines)]
    assert cli.main(score_argv(setup, out)) == 0  # one process finishes it
    assert out.read_text() == setup["reference"]


def test_cut_at_one_process_resumes_at_three_ranks(setup, tmp_path):
    out = tmp_path / "cut.jsonl"
    lines = whole_lines(setup["reference"])
    # a one-process run killed in the middle of its 2nd chunk: 5 whole lines and half of the 6th
    out.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    sidecar = (setup["root"] / "one.jsonl.meta.json").read_text()
    (tmp_path / "cut.jsonl.meta.json").write_text(sidecar.replace('"one.jsonl"', '"cut.jsonl"'))
    done = launched(setup, 3, score_argv(setup, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dropped a partial last line" in done.stderr
    assert out.read_text() == setup["reference"]


def test_a_rank_that_raises_stops_every_rank(setup, tmp_path):
    out = tmp_path / "raised.jsonl"
    done = launched(setup, 2, score_argv(setup, out), failure=("raise", 1, 2))
    assert done.returncode != 0
    assert "grm-engine score: rank 1 failed: RuntimeError: injected failure on rank 1" in done.stderr
    assert done.stderr.count("injected failure on rank 1\n") == 2  # the traceback's last line and the summary, once
    assert whole_lines(out.read_text()) == whole_lines(setup["reference"])[:CHUNK]  # nothing of the failed chunk
    assert cli.main(score_argv(setup, out)) == 0
    assert out.read_text() == setup["reference"]


def test_a_check_that_fails_on_rank_0_only_stops_every_rank(setup, tmp_path):
    """--out is a folder: only rank 0 checks the output, and the other rank must not go on to load a model."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    done = run_cli(score_argv(setup, folder, "--devices=cpu,cpu"), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count(f"grm-engine score: error: --out {folder} is a directory") == 1
    assert os.listdir(folder) == []


def tiny_meta_rm(model: str, path) -> str:
    """A random-init one-label LlamaForSequenceClassification over the model's tokenizer (a meta RM folder)."""
    import torch
    import transformers as tf

    from grm_engine.demo import tiny_config

    tokenizer = tf.AutoTokenizer.from_pretrained(model)
    torch.manual_seed(2)
    tf.LlamaForSequenceClassification(tiny_config("llama", tokenizer, num_labels=1)).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def test_eval_on_two_ranks_equals_one(setup, tmp_path):
    """With a meta RM too: each rank scores its own samples' critiques with it (MetaRM@k columns equal)."""
    meta = tiny_meta_rm(setup["model"], tmp_path / "meta")
    argv = ["eval", "--model", setup["model"], "--data", setup["data"], "--k", "1,3", "--chunk-size", str(CHUNK),
            "--max-tokens", "12", "--max-num-seqs", "32", "--temperature", "1.0", "--meta-rm", meta, "--k-meta", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main([*argv, "--device", "cpu", "--out-dir", str(one)]) == 0
    done = run_cli([*argv, "--devices", "cpu,cpu", "--out-dir", str(two)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((folder / "results.json").read_text()) for folder in (one, two)]
    assert results[0]["methods"] == results[1]["methods"]
    assert any(name.startswith("MetaRM@") for name in results[0]["methods"]), list(results[0]["methods"])
    for key in ("greedy_run", "sampled_run"):
        for stat in ("examples", "samples", "parse_failures", "generated_tokens", "prompt_tokens"):
            assert results[0][key][stat] == results[1][key][stat], (key, stat)
    assert (one / "samples.jsonl").read_text() == (two / "samples.jsonl").read_text()


def test_devices_argument():
    from grm_engine.parallel import parse_devices, strip_devices

    assert parse_devices("cpu,cpu,cpu") == ["cpu"] * 3
    for text, needle in (("0,0", "listed twice"), ("0,x", "CUDA device indices"), ("", "comma-separated"),
                         ("0,999", "CUDA devices")):
        with pytest.raises(ValueError, match=needle):
            parse_devices(text)
    with pytest.raises(ValueError, match="not both"):
        parse_devices("cpu,cpu", device="cpu")
    with pytest.raises(ValueError, match="under a launcher"):
        parse_devices("cpu,cpu", world=2)
    assert strip_devices(["score", "--devices", "0,1", "--k", "2", "--devices=3"]) == ["score", "--k", "2"]
