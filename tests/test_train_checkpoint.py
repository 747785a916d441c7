"""Checkpoints that survive a kill (grm_engine.train.checkpoint, loop, metrics) on a tiny Qwen2 on the CPU.

The peer of every resumed run is an uninterrupted run of the same config in this process: on a CPU with the same
thread count the resumed losses, gradient norms and final weights must equal it bit for bit.
"""
import os
import shutil
import warnings

import pytest
import torch

from grm_engine.train import train
from grm_engine.train.checkpoint import MARKER, checkpoint_problem, complete_checkpoints, latest_checkpoint
from train_helpers import few_threads, kill_during_step_4_then_rerun, load_weights, read_metrics  # noqa: F401
from train_helpers import sft_settings, write_sft_data

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sft_data(tmp_path_factory.mktemp("ckpt_data") / "sft.jsonl", count=24, seed=2)


@pytest.fixture(scope="module")
def uninterrupted(base, data, tmp_path_factory):
    """The peer: STEPS steps, never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train("sft", sft_settings(base, data, out, max_steps=STEPS), log=lambda *a: None)
    return out


def metrics_by_step(output_dir) -> dict[int, dict]:
    rows = read_metrics(output_dir)
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metrics.jsonl holds a step twice: {steps}"
    return {r["step"]: r for r in rows}


def assert_same_steps(run, peer, steps):
    got, want = metrics_by_step(run), metrics_by_step(peer)
    for step in steps:
        for key in ("loss", "grad_norm", "lr", "completion_tokens"):
            assert got[step][key] == want[step][key], f"step {step} {key}: {got[step][key]} != {want[step][key]}"


def assert_same_weights(a, b):
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_uninterrupted_run_layout(uninterrupted):
    metrics = metrics_by_step(uninterrupted)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    # 24 rows, 2 micro-batches of 4 per step: 3 steps per epoch; "epoch" counts the steps done
    assert [metrics[s]["epoch"] for s in (1, 3, 6)] == pytest.approx([1 / 3, 1.0, 2.0])
    # save_steps 2, save_total_limit 3: checkpoints 2, 4, 6 kept, each complete
    assert [os.path.basename(p) for p in complete_checkpoints(str(uninterrupted))] == [
        "checkpoint-6", "checkpoint-4", "checkpoint-2"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.pt",
                 "rng_state_0.pt", MARKER):
        assert os.path.isfile(uninterrupted / "checkpoint-4" / name), name
    assert not [n for n in os.listdir(uninterrupted) if n.startswith(".tmp")]
    assert_same_weights(uninterrupted / "final", uninterrupted / "checkpoint-6")


def test_sigkill_then_rerun_continues_bit_for_bit(base, data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    kill_during_step_4_then_rerun("sft", sft_settings(base, data, out, max_steps=STEPS))
    assert sorted(metrics_by_step(out)) == list(range(1, STEPS + 1))  # each step once
    assert_same_steps(out, uninterrupted, range(1, STEPS + 1))
    assert_same_weights(out / "final", uninterrupted / "final")


def corrupt_truncate(checkpoint):
    path = checkpoint / "model.safetensors"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def corrupt_unmarked(checkpoint):
    os.remove(checkpoint / MARKER)


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_unmarked])
def test_damaged_newest_checkpoint_is_skipped(base, data, uninterrupted, tmp_path, corrupt):
    """A checkpoint whose model was cut short, or whose save never finished (no COMPLETE), is skipped: the
    rerun continues from the previous complete one and matches the uninterrupted run."""
    out = tmp_path / "run"
    train("sft", sft_settings(base, data, out, max_steps=4), log=lambda *a: None)
    corrupt(out / "checkpoint-4")
    shutil.copytree(out / "checkpoint-2", out / ".tmp-checkpoint-6")  # a save cut before its rename
    assert checkpoint_problem(str(out / "checkpoint-4")) is not None
    with pytest.warns(UserWarning, match="skipping .*checkpoint-4"):
        assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")

    logs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train("sft", sft_settings(base, data, out, max_steps=STEPS), log=logs.append)  # max_steps may grow
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in logs
    assert sorted(metrics_by_step(out)) == list(range(1, STEPS + 1))
    assert_same_steps(out, uninterrupted, range(1, STEPS + 1))
    assert_same_weights(out / "final", uninterrupted / "final")
    assert checkpoint_problem(str(out / "checkpoint-4")) is None  # rewritten whole


def test_checkpoint_problem_names_the_damage(uninterrupted, tmp_path):
    copy = tmp_path / "checkpoint-6"
    shutil.copytree(uninterrupted / "checkpoint-6", copy)
    assert checkpoint_problem(str(copy)) is None
    os.remove(copy / "optimizer.pt")
    assert "optimizer.pt is missing" in checkpoint_problem(str(copy))
    corrupt_truncate(copy)
    shutil.copy(uninterrupted / "checkpoint-6" / "optimizer.pt", copy / "optimizer.pt")
    assert "model.safetensors has" in checkpoint_problem(str(copy))
    corrupt_unmarked(copy)
    assert "COMPLETE" in checkpoint_problem(str(copy))


def test_finished_run_is_not_silently_retrained(base, data, uninterrupted):
    from grm_engine.train import ConfigError

    with pytest.raises(ConfigError, match="finished run"):
        train("sft", sft_settings(base, data, uninterrupted, max_steps=STEPS), log=lambda *a: None)
