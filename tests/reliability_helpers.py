"""Shared pieces of the reliability and fuzz tests (tests/test_reliability_*.py, tests/test_fuzz_*.py): a tiny
checkpoint folder with a tokenizer, folder fingerprints (nothing unrelated changed), the outcome of one CLI call
(exit status + stderr, an escaped exception counted as a traceback), and the kill loop of the interruption tests
(a subprocess killed when a condition on disk holds)."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import torch

_CACHE: dict = {}


def tiny_checkpoint(root) -> str:
    """A tiny random-init untied Llama (2 layers, hidden 64) with the demo's BPE tokenizer, saved under root once
    per process; returns its folder. Copy it before editing it."""
    if "checkpoint" in _CACHE:
        return _CACHE["checkpoint"]
    import transformers as tf

    from grm_engine.demo import build_tokenizer, tiny_config

    path = os.path.join(str(root), "tiny_llama")
    tokenizer = build_tokenizer(path)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tiny_config("llama", tokenizer)).save_pretrained(path)
    _CACHE["checkpoint"] = path
    return path


def fingerprint(folder, skip=()) -> dict[str, str]:
    """relative path -> sha256 of every file under folder (names in skip, at any depth, left out)."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(str(folder)):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name in skip:
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, str(folder))] = hashlib.sha256(f.read()).hexdigest()
    return result


def cli_outcome(argv, capsys, passthrough=()) -> tuple[int | str, str]:
    """Run grm_engine.cli.main in this process -> (exit status, stderr); an exception that escapes main (a
    traceback for the user) comes back as ("traceback", its type and message), except the passthrough types."""
    from grm_engine import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse: exit 2 with a usage message
        code = e.code
    except passthrough:
        raise
    except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
        capsys.readouterr()
        return "traceback", f"{type(e).__name__}: {e}"
    return code, capsys.readouterr().err


def kill_when(command, condition, *, sig=signal.SIGKILL, env=None, timeout: float = 180, poll: float = 0.02,
              preexec_fn=None) -> subprocess.CompletedProcess:
    """Start command, send sig once condition() holds (checked every poll seconds), wait for the end. Fails the test
    if the process ends first or the condition never holds within timeout."""
    def setup():  # a test run from a background job inherits SIGINT ignored, and the child would keep ignoring it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec_fn is not None:
            preexec_fn()

    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=setup)
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the process ended (status {process.returncode}) before it could be killed:\n"
                                 f"{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            process.communicate()
            raise AssertionError(f"the kill condition did not hold within {timeout} s")
        time.sleep(poll)
    process.send_signal(sig)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def file_size_limit(limit_bytes: int, *, ignore_signal: bool = False):
    """A preexec_fn that caps the size of any file the child writes (RLIMIT_FSIZE): the write that crosses it is
    cut there and the child dies of SIGXFSZ; with ignore_signal the write fails with EFBIG (OSError) instead."""
    def limit():
        import resource

        if ignore_signal:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return limit


def python_command(*args) -> list[str]:
    return [sys.executable, "-m", "grm_engine", *args]


# The CLI with one function slowed down (a sleep before each call) and, when GRM_TEST_MARKS names a file, one byte
# appended to it after each call, so a test can interrupt the run between two calls; the interrupted run and its
# rerun run the same command, nothing in the product changes.
SLOW_CLI = ("import importlib, os, sys, time\n"
            "module_name, class_name, method, seconds = sys.argv[1:5]\n"
            "owner = getattr(importlib.import_module(module_name), class_name)\n"
            "original = getattr(owner, method)\n"
            "def slow(*args, **kwargs):\n"
            "    time.sleep(float(seconds))\n"
            "    result = original(*args, **kwargs)\n"
            "    if os.environ.get('GRM_TEST_MARKS'):\n"
            "        with open(os.environ['GRM_TEST_MARKS'], 'a') as f:\n"
            "            f.write('x')\n"
            "    return result\n"
            "setattr(owner, method, slow)\n"
            "from grm_engine.cli import main\n"
            "sys.exit(main(sys.argv[5:]))\n")


def slow_cli(target: str, seconds: float, *args) -> list[str]:
    """[python, -c, SLOW_CLI, ...]: `python -m grm_engine ARGS` with target ("module:Class.method") sleeping
    `seconds` before each call."""
    module_name, qualified = target.split(":")
    class_name, method = qualified.split(".")
    return [sys.executable, "-c", SLOW_CLI, module_name, class_name, method, str(seconds), *args]


def marks(path) -> int:
    """Calls the slowed function finished so far (see SLOW_CLI)."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def interrupt(command, how: str, *, after_calls: int, marks_file, limit_bytes: int, env: dict):
    """Run command (a slow_cli command) and interrupt it: "SIGINT" / "SIGKILL" once after_calls calls of the slowed
    function finished, or "SIGXFSZ" / "EFBIG": a file-size limit of limit_bytes on every file it writes (the write
    crossing it kills the process, or fails with EFBIG when the signal is ignored). -> the CompletedProcess."""
    env = dict(env, GRM_TEST_MARKS=str(marks_file))
    if how in ("SIGXFSZ", "EFBIG"):
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                              preexec_fn=file_size_limit(limit_bytes, ignore_signal=how == "EFBIG"))
    sig = {"SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}[how]
    return kill_when(command, lambda: marks(marks_file) >= after_calls, sig=sig, env=env)


def lines_of(path) -> list[str]:
    """Whole lines of a file (a cut last line left out); [] when it does not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []
