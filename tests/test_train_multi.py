"""Training across processes on the CPU (DeepSpeed with DS_ACCELERATOR=cpu, gloo), what tests/test_train_deepspeed.py
does not cover: GRPO under torchrun with ZeRO-3 (rollouts from the gathered weights on every rank) logs the same
step metrics as one process (global values, not rank 0's), and a checkpoint resumes at
another world size through DeepSpeed's universal checkpoint (ZeRO-2; ZeRO-3 is refused before any model loads).
Runs that use DeepSpeed are subprocesses (its process group and launcher variables must not leak)."""
import importlib.util
import json
import os
import sys

import pytest

from grm_engine.demo_task import make_task_examples, write_examples_jsonl
from grm_engine.train import train
from test_train_grpo_loop import warm_model  # noqa: F401 (fixture)
from train_helpers import build_base, few_threads, flags, losses_by_step, read_metrics, run_cli  # noqa: F401
from train_helpers import sft_settings, subprocess_env, write_sft_data

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def ds_env():
    return subprocess_env(DS_ACCELERATOR="cpu")


def test_grpo_on_two_ranks_logs_global_metrics(warm_model, tmp_path):  # noqa: F811
    """One process with 4 prompts per step and a full reference copy vs two with 2 each (ZeRO-3: each rank rolls
    out from the gathered weights; the reference partitioned across the ranks, reference = sharded). Samples are
    keyed by example and both runs hold the same weights (to rounding), so every rollout number of a step must be
    the same, rank 0 alone saw half of them; and the KL term (beta 0.5) is the same, so the sharded reference gives
    the copy's log-probs."""
    data = write_examples_jsonl(tmp_path / "examples.jsonl", make_task_examples(16, seed=3))
    common = dict(model=warm_model, data=data, max_steps=2, logging_steps=1, save_steps=0, num_generations=4,
                  learning_rate=1e-3, beta=0.5, temperature=1.0, max_completion_length=8, seed=5, device="cpu",
                  report_plot=False, log_completions_steps=0)
    one, two = tmp_path / "one", tmp_path / "two"
    train("grpo", dict(common, output_dir=str(one), per_device_train_batch_size=4), log=lambda *a: None)
    done = run_cli(["-m", "grm_engine", "train", "grpo"] + flags(dict(common, output_dir=str(two), deepspeed="zero3",
                                                                       per_device_train_batch_size=2,
                                                                       reference="sharded")),
                   prefix=TORCHRUN, env=ds_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "reference: partitioned by ZeRO-3 across 2 ranks" in done.stdout + done.stderr
    assert [row["step"] for row in read_metrics(two)] == [1, 2]
    for first, second in zip(read_metrics(one), read_metrics(two)):  # step 2: both from their updated weights
        check_same_step(first, second)
    assert all(row["gather_s"] > 0 for row in read_metrics(two)) and all(row["gather_s"] == 0 for row in read_metrics(one))
    assert read_metrics(one)[1]["kl"] > 1e-6  # step 2's policy moved away from the reference: the KL term counts


def check_same_step(first: dict, second: dict) -> None:
    for key in ("generated_tokens", "reward_mean", "accuracy", "completion_length_mean", "completion_length_max",
                "parse_failure_rate", "zero_advantage_group_fraction", "zero_advantage_frac", "trained_rows",
                "truncated_fraction"):
        assert second[key] == pytest.approx(first[key], abs=1e-12), (key, first[key], second[key])
    assert 0 < first["accuracy"] < 1  # the warm model says either verdict: a rank's own mean would differ
    for key in ("loss", "kl", "grad_norm"):
        assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key


ONE_PROCESS_UNIVERSAL = """
import json, os, sys
import grm_engine.train.checkpoint as checkpoint
from grm_engine.train import train
settings = json.loads(sys.argv[1])
# 1. the two-process run's checkpoint-2, resumed by this one process (DeepSpeed's universal checkpoint)
train("sft", settings["two"], log=print)
# 2. at one world size, a resume forced through the universal checkpoint continues exactly as DeepSpeed's own
train("sft", settings["native"], log=print)
os.rename(os.path.join(settings["native"]["output_dir"], "metrics.jsonl"),
          os.path.join(settings["native"]["output_dir"], "metrics.first.jsonl"))
os.remove(os.path.join(settings["native"]["output_dir"], "checkpoint-4", "COMPLETE"))
checkpoint.saved_world_size = lambda path: 3
train("sft", settings["native"], log=print)
"""


def test_zero2_checkpoint_resumes_at_another_world_size(tmp_path):
    base = build_base(tmp_path)
    data = write_sft_data(tmp_path / "sft.jsonl", count=32, seed=4)
    two = sft_settings(base, data, tmp_path / "two", max_steps=4, deepspeed="zero2", per_device_train_batch_size=2)
    done = run_cli(["-m", "grm_engine", "train", "sft"] + flags(two), prefix=TORCHRUN, env=ds_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    before = losses_by_step(tmp_path / "two")
    os.remove(tmp_path / "two" / "checkpoint-4" / "COMPLETE")
    native = sft_settings(base, data, tmp_path / "native", max_steps=4, deepspeed="zero2", per_device_train_batch_size=2)
    done = run_cli(["-c", ONE_PROCESS_UNIVERSAL, json.dumps({"two": two, "native": native})], prefix=[sys.executable],
                   env=ds_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"resumed from {tmp_path / 'two' / 'checkpoint-2'} at step 2" in done.stdout
    assert "written by 2 processes, resumed by 1 through DeepSpeed's universal checkpoint" in done.stderr
    assert os.path.isdir(tmp_path / "two" / "checkpoint-2" / "deepspeed_universal")
    after = losses_by_step(tmp_path / "two")
    assert sorted(after) == [1, 2, 3, 4] and after[1] == before[1] and after[2] == before[2]
    with open(tmp_path / "native" / "metrics.first.jsonl") as f:
        first = {row["step"]: row for row in map(json.loads, f)}
    resumed = {row["step"]: row for row in read_metrics(tmp_path / "native")}
    for step in (3, 4):  # weights, Adam moments and the LR schedule all came back: bit for bit on the CPU
        assert (resumed[step]["loss"], resumed[step]["grad_norm"]) == (first[step]["loss"], first[step]["grad_norm"])


def test_zero3_checkpoint_at_another_world_size_is_refused(tmp_path):
    """Checked from the checkpoint folder and the config alone, before any model loads."""
    from grm_engine.train.checkpoint import check_resume_world_size, saved_world_size
    from grm_engine.train.config import ConfigError, SFTConfig

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    for rank in (0, 1):
        (folder / f"rng_state_{rank}.pt").write_bytes(b"")
    assert saved_world_size(str(folder)) == 2
    with pytest.raises(ConfigError, match="written by 2 processes and this run has 1: a ZeRO-3 checkpoint"):
        check_resume_world_size(SFTConfig(model="m", data="d", output_dir="o", deepspeed="zero3"), str(folder))
    check_resume_world_size(SFTConfig(model="m", data="d", output_dir="o", deepspeed="zero2"), str(folder))


def test_rft_sampling_shared_by_two_ranks(tmp_path):
    """`train rft` under torchrun (ZeRO-2): each rank samples every second example from its own model copy and rank 0
    writes the files in input order; they equal one process's files (samples are keyed by example id), and SFT
    runs on them."""
    from train_helpers import build_rft_run

    single = build_rft_run(tmp_path / "single")
    out = tmp_path / "two"
    settings = dict(model=single["critic"], data=single["data"], output_dir=str(out), num_generations=3,
                    temperature=1.0, max_completion_length=16, max_steps=2, per_device_train_batch_size=1,
                    learning_rate=1e-4, logging_steps=1, save_steps=0, report_plot=False, seed=0, device="cpu",
                    deepspeed="zero2")
    done = run_cli(["-m", "grm_engine", "train", "rft"] + flags(settings), prefix=TORCHRUN, env=ds_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "of 2)" in done.stdout + done.stderr  # the sampling log names the shard
    for name in ("rft_samples.jsonl", "rft_trajectories.jsonl"):
        with open(os.path.join(single["output_dir"], name)) as f1, open(out / name) as f2:
            assert f2.read() == f1.read(), name
    with open(os.path.join(single["output_dir"], "rft_counts.json")) as f1, open(out / "rft_counts.json") as f2:
        first, second = json.load(f1), json.load(f2)
    assert {k: v for k, v in second.items() if isinstance(v, int)} == {k: v for k, v in first.items() if isinstance(v, int)}
    assert [row["step"] for row in read_metrics(out)] == [1, 2]


def test_several_processes_without_deepspeed_is_a_clear_error_before_anything_is_written(tmp_path):
    """torchrun with 2 processes and no --deepspeed: every rank stops at the output_dir step with a usage error
    (exit 2) naming the fix; output_dir is not created."""
    base = build_base(tmp_path)
    data = write_sft_data(tmp_path / "sft.jsonl", count=8, seed=1)
    out = tmp_path / "out"
    settings = sft_settings(base, data, out, max_steps=1)
    done = run_cli(["-m", "grm_engine", "train", "sft"] + flags(settings), prefix=TORCHRUN, env=subprocess_env(),
                   timeout=300)
    assert done.returncode != 0
    assert "several processes train only under DeepSpeed" in done.stderr, done.stderr[-3000:]
    assert "exitcode: 2" in done.stderr  # the ranks' own exit status: a usage error, not a traceback
    assert not out.exists()
