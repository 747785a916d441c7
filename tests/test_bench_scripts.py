"""Bench scripts checked on the CPU. The scale-out runs (bench/gpu_scale_out.sh, issue 15) wait for a machine with
4 or 8 GPUs: their commands must stay valid until then. A dry run prints them; every command they name must parse
with its program's own parser (bench/gpu_grpo.py's, the CLI's): an unknown or mistyped flag fails here. The eval
comparison tool (bench/compare_evals.py) runs on small files."""
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(part: str, gpus: int, tmp_path) -> list[list[str]]:
    env = dict(os.environ, SCALE_OUT_DRY="1", GPUS=str(gpus), OUT=str(tmp_path))
    done = subprocess.run(["bash", "bench/gpu_scale_out.sh", part], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    commands = [shlex.split(line[2:].split(" > ")[0]) for line in done.stderr.splitlines() if line.startswith("+ ")]
    assert commands, done.stderr
    return commands


def script_args(command: list[str], script: str) -> list[str]:
    """The arguments a command passes to `script` (after torchrun's own options)."""
    return command[command.index(script) + 1:]


@pytest.mark.parametrize("part,gpus,expected", [
    ("score05", 8, ["--devices 0 ", "--devices 0,1 ", "--devices 0,1,2,3 ", "--devices 0,1,2,3,4,5,6,7 "]),
    ("score7b", 4, ["--devices 0,1,2,3 "]),
    ("grpo7b", 8, ["--nproc-per-node 2 ", "--nproc-per-node 4 ", "--nproc-per-node 8 "]),
    ("gemma27b", 8, ["--nproc-per-node 8 ", "--shape gemma2-27b", "--reference sharded", "--zero-init"]),
])
def test_scale_out_commands_parse(part, gpus, expected, tmp_path):
    commands = dry_run(part, gpus, tmp_path)
    text = "\n".join(" ".join(c) + " " for c in commands)
    for piece in expected:
        assert piece in text, (piece, text)
    for command in commands:
        if "bench/gpu_grpo.py" in command:
            sys.path.insert(0, os.path.join(ROOT, "bench"))
            try:
                import gpu_grpo
            finally:
                sys.path.pop(0)
            gpu_grpo.build_parser().parse_args(script_args(command, "bench/gpu_grpo.py"))  # SystemExit on a bad flag
        elif "grm_engine" in command and "score" in command:
            from grm_engine.cli import build_parser

            args = script_args(command, "grm_engine")
            build_parser().parse_args(args)  # SystemExit (a failed test) on a flag the CLI does not take


def test_unknown_part_is_refused(tmp_path):
    env = dict(os.environ, SCALE_OUT_DRY="1", GPUS="8", OUT=str(tmp_path))
    done = subprocess.run(["bash", "bench/gpu_scale_out.sh", "everything"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown part" in done.stdout


def test_compare_evals_counts_identical_samples_and_differing_values(tmp_path):
    """bench/compare_evals.py (the 1 vs 2 GPU eval check): one changed sample text and one changed accuracy are
    reported as such; examples in another order are refused."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from compare_evals import compare

    def write(folder, texts, accuracy, ids=("a", "b")):
        folder.mkdir()
        summary = {"Voting@8": {"accuracy": accuracy, "ties": 0.1}, "Greedy": {"accuracy": 0.5}}
        (folder / "results.json").write_text(json.dumps({"summary": summary, "methods": summary}))
        rows = [{"id": i, "samples": [{"text": t} for t in pair]} for i, pair in zip(ids, texts)]
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(folder)

    one = write(tmp_path / "one", [("x", "y"), ("z", "w")], 0.75)
    two = write(tmp_path / "two", [("x", "y"), ("z", "CHANGED")], 0.5)
    report = compare(one, two)
    assert (report["samples"], report["identical_samples"]) == (4, 3)
    assert report["values_differing"] == 2 and report["max_diff"] == 0.25  # summary and methods
    assert set(report["differing"]) == {"summary.Voting@8.accuracy", "methods.Voting@8.accuracy"}
    assert compare(one, one)["values_differing"] == 0
    swapped = write(tmp_path / "swapped", [("x", "y"), ("z", "w")], 0.75, ids=("b", "a"))
    with pytest.raises(SystemExit, match="different examples or orders"):
        compare(one, swapped)
