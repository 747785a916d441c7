"""The training engine under DeepSpeed on the CPU (DS_ACCELERATOR=cpu, gloo): ZeRO-2 and ZeRO-3 (with gradient
checkpointing, decoder layers fetched whole) in one process and ZeRO-2 over two processes under torchrun give the
plain PyTorch run's losses (fp32: equal within rounding), and a rerun resumes from DeepSpeed's own checkpoint. Runs
are subprocesses: DeepSpeed sets up a process group and launcher variables that must not leak into the other tests.
The first DeepSpeed use on a machine builds a small shared-memory op with ninja (a minute or more, once)."""
import importlib.util
import json
import os
import sys

import pytest

from train_helpers import flags, load_weights, losses_by_step, run_cli, sft_settings, subprocess_env
from train_helpers import write_sft_data

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

STEPS = 4
# plain, zero2 and zero3 one after the other in one process (the one-member process group is made once), then a
# ZeRO-3 rerun after checkpoint-4 is damaged: it must resume from DeepSpeed's checkpoint-2 shards
ONE_PROCESS = """
import json, os, shutil, sys
from grm_engine.train import train
runs = json.loads(sys.argv[1])
for name, settings in runs.items():
    train("sft", settings, log=print)
zero3 = runs["zero3"]["output_dir"]
shutil.copy(os.path.join(zero3, "metrics.jsonl"), os.path.join(zero3, "metrics.first.jsonl"))
os.remove(os.path.join(zero3, "checkpoint-4", "COMPLETE"))
train("sft", runs["zero3"], log=print)
"""


def ds_env():
    return subprocess_env(DS_ACCELERATOR="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sft_data(tmp_path_factory.mktemp("ds_data") / "sft.jsonl", count=32, seed=4)


@pytest.fixture(scope="module")
def one_process(base, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_one")
    # the ZeRO-3 run also recomputes activations (gradient checkpointing inside the layers ZeRO-3 fetches whole)
    runs = {name: sft_settings(base, data, root / name, max_steps=STEPS, deepspeed=preset, gradient_checkpointing=gc)
            for name, preset, gc in (("plain", "", False), ("zero2", "zero2", False), ("zero3", "zero3", True))}
    done = run_cli(["-c", ONE_PROCESS, json.dumps(runs)], env=ds_env(), prefix=[sys.executable], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return root, done.stdout


def assert_losses_close(got: dict, want: dict, steps):
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}: {got[step]} vs {want[step]}"


def test_zero2_and_zero3_match_plain(one_process):
    root, _ = one_process
    plain = losses_by_step(root / "plain")
    assert sorted(plain) == list(range(1, STEPS + 1))
    assert len(set(plain.values())) == STEPS  # the steps do move the model
    for stage in ("zero2", "zero3"):
        assert_losses_close(losses_by_step(root / stage), plain, range(1, STEPS + 1))
        assert os.path.isdir(root / stage / "checkpoint-2" / "deepspeed")
        # the consolidated model sits beside DeepSpeed's shards and loads like any checkpoint
        weights, want = load_weights(root / stage / "final"), load_weights(root / "plain" / "final")
        assert weights.keys() == want.keys()
        for name in want:
            assert weights[name].float().sub(want[name]).abs().max() < 1e-5, (stage, name)


def test_zero3_preset_fetches_decoder_blocks_whole(one_process):
    """The zero3 preset's leaf_module "auto" became the model's decoder-layer class: the equal-loss ZeRO-3 run above
    fetched each block's parameters at once (the base model has 2 layers)."""
    _, stdout = one_process
    assert "ZeRO-3 fetches 2 blocks whole (leaf_module: Qwen2DecoderLayer)" in stdout


def test_resolve_leaf_modules_keeps_a_written_list():
    from grm_engine.train.engine import resolve_leaf_modules

    class Model:
        _no_split_modules = ["Qwen2DecoderLayer"]

    auto = resolve_leaf_modules({"zero_optimization": {"stage": 3, "leaf_module": {"classes": ["auto", "MyBlock"]}}},
                                Model())
    classes = auto["zero_optimization"]["leaf_module"]["classes"]
    assert classes[:2] == ["MyBlock", "Qwen2DecoderLayer"] and "auto" not in classes
    assert len(classes) == len(set(classes)) > 2  # DeepSpeed's default MoE blocks kept
    written = {"zero_optimization": {"stage": 3, "leaf_module": {"classes": ["MyBlock"]}}}
    assert resolve_leaf_modules(written, Model())["zero_optimization"]["leaf_module"]["classes"] == ["MyBlock"]
    assert resolve_leaf_modules({"zero_optimization": {"stage": 3}}, Model()) == {"zero_optimization": {"stage": 3}}


def test_zero3_resume_from_deepspeed_checkpoint(one_process):
    root, stdout = one_process
    out = root / "zero3"
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in stdout
    first = {}
    with open(out / "metrics.first.jsonl") as f:
        for line in f:
            row = json.loads(line)
            first[row["step"]] = row["loss"]
    resumed = losses_by_step(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert_losses_close(resumed, first, range(1, STEPS + 1))


def test_torchrun_two_processes_zero2(one_process, base, data, tmp_path):
    """`torchrun --nproc-per-node 2 -m grm_engine train sft --deepspeed zero2` at the same global batch (2 rows
    per process x 2 accumulation x 2 processes) gives the one-process losses; rerunning the same command after
    the newest checkpoint is damaged resumes from the previous one (every rank loads its shards)."""
    root, _ = one_process
    out = tmp_path / "two"
    settings = sft_settings(base, data, out, max_steps=STEPS, deepspeed="zero2", per_device_train_batch_size=2)
    command = ["--standalone", "--nproc-per-node", "2", "-m", "grm_engine", "train", "sft"] + flags(settings)
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    done = run_cli(command, env=ds_env(), prefix=launcher, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    plain = losses_by_step(root / "plain")
    two = losses_by_step(out)
    assert sorted(two) == list(range(1, STEPS + 1))
    assert_losses_close(two, plain, range(1, STEPS + 1))
    assert sorted(os.listdir(out / "checkpoint-4")).count("rng_state_1.pt") == 1  # every rank's RNG state

    os.remove(out / "checkpoint-4" / "COMPLETE")
    again = run_cli(command, env=ds_env(), prefix=launcher, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in again.stdout
    assert_losses_close(losses_by_step(out), plain, range(1, STEPS + 1))
