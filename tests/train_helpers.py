"""Shared pieces of the training tests (tests/test_train_*.py): a tiny base model directory, small data files,
the CLI in a subprocess, a run killed mid-step and resumed, and metrics.jsonl readers.

The base model is a random-init 2-layer Qwen2 with hidden size 32 over the demo's 512-token BPE tokenizer
(grm_engine.demo.build_tokenizer), built once per process. Prompts are a few words, not build_prompt's template,
so a training step takes milliseconds. Training runs use one intra-op thread: the tensors are tiny (threads only
add synchronization), and a subprocess then computes exactly what the test process computes.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from reliability_helpers import kill_when, slow_cli

_CACHE: dict = {}
THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    """Autouse in every module that imports it: THREADS intra-op threads while its tests run."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def build_base(root) -> str:
    """A tiny random-init Qwen2 checkpoint (safetensors + tokenizer) under root; built once per process."""
    if "base" in _CACHE:
        return _CACHE["base"]
    import transformers as tf

    from grm_engine.demo import build_tokenizer

    path = os.path.join(str(root), "base")
    tokenizer = build_tokenizer(path)
    config = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=1024,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(config).save_pretrained(path)
    _CACHE["base"] = path
    return path


def write_sft_data(path, count: int = 32, seed: int = 0) -> str:
    """count rows of a few random words each: {"prompt", "completion"}."""
    from grm_engine.demo import sentence

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            f.write(json.dumps({"prompt": sentence(rng, 2, 6), "completion": sentence(rng, 1, 5)}) + "\n")
    return str(path)


def sft_settings(base: str, data: str, output_dir, **extra) -> dict:
    """A small SFT config as a dict of keys (lr high enough that every step visibly moves the weights)."""
    settings = dict(model=base, data=data, output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, logging_steps=1, save_steps=2, save_total_limit=3,
                    learning_rate=1e-2, report_plot=False, seed=3)
    settings.update(extra)
    return settings


def flags(settings: dict) -> list[str]:
    """{"max_steps": 6, ...} -> ["--max_steps", "6", ...]"""
    out = []
    for key, value in settings.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launcher's variables must not leak into a plain run
    env.update(extra)
    return env


def run_cli(args: list[str], *, env=None, timeout: float = 300, prefix=None, cwd=None) -> subprocess.CompletedProcess:
    """`python -m grm_engine ARGS` (or `prefix + ARGS`) -> the finished process (stdout, stderr as text)."""
    command = (prefix or [sys.executable, "-m", "grm_engine"]) + list(args)
    return subprocess.run(command, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(str(output_dir), "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def logged_steps(output_dir) -> list[int]:
    """Steps with a whole line in output_dir/metrics.jsonl so far (a run still writing may have cut the last)."""
    try:
        with open(os.path.join(str(output_dir), "metrics.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def kill_during_step_4_then_rerun(stage: str, settings: dict) -> int:
    """`grm-engine train STAGE` with settings (save_steps 2, max_steps > 4) in a subprocess, every optimizer step
    slowed by 0.4 s so that the kill lands inside a step: SIGKILL once checkpoint-2 exists and step 3 is logged
    (during step 4, so the metrics line of step 3 lies past the checkpoint and the rerun must replace it, not repeat
    it). Checks the killed run left no final model and logged past its last checkpoint, reruns the same command and
    checks it resumed from that checkpoint. Returns the step of that checkpoint."""
    from grm_engine.train.checkpoint import latest_checkpoint

    out, max_steps = settings["output_dir"], settings["max_steps"]
    command = slow_cli("grm_engine.train.engine:Engine.step", 0.4, "train", stage, *flags(settings))
    killed = kill_when(command, lambda: os.path.exists(os.path.join(out, "checkpoint-2")) and 3 in logged_steps(out),
                       env=subprocess_env(), timeout=180)
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "final"))
    killed_at = int(os.path.basename(latest_checkpoint(out)).split("-")[1])
    assert 2 <= killed_at < max_steps and max(logged_steps(out)) > killed_at

    rerun = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {os.path.join(out, f'checkpoint-{killed_at}')} at step {killed_at}" in rerun.stdout
    return killed_at


def losses_by_step(output_dir) -> dict[int, float]:
    rows = read_metrics(output_dir)
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metrics.jsonl holds a step twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def load_weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(str(model_dir), "model.safetensors"))


def rft_examples(count: int = 8, seed: int = 9):
    """2-response examples and every fourth with 3 responses (best = 0, shown in shuffled orders)."""
    from grm_engine.demo import make_examples

    return make_examples(count, seed=seed, three_every=4)


def build_critic(root) -> str:
    """The base model fine-tuned (with `train sft`) to answer build_prompt prompts with DEMO_CRITIQUE
    ("\\boxed{9, 2}": 9 for the response shown first): its critiques parse, and are correct exactly when the
    best response is shown first. Trained on the unhinted prompts (two orders) and the hint "Response 1" only,
    so a hint naming another position gives text it has not learned. Built once per process."""
    if "critic" in _CACHE:
        return _CACHE["critic"]
    from grm_engine.demo import DEMO_CRITIQUE
    from grm_engine.protocol import build_prompt
    from grm_engine.train import train

    base = build_base(root)  # may come from the cache, built under another test's root: root may not exist yet
    os.makedirs(root, exist_ok=True)
    data = os.path.join(str(root), "critic.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for example in rft_examples(5, seed=5):
            for order in ([0, 1, 2], [1, 0, 2])[: example.num_responses]:
                shown = [example.responses[i] for i in order[: example.num_responses]]
                f.write(json.dumps({"prompt": build_prompt(example.query, shown), "completion": DEMO_CRITIQUE}) + "\n")
            if example.num_responses == 2:
                prompt = build_prompt(example.query, example.responses, hint=0)
                f.write(json.dumps({"prompt": prompt, "completion": DEMO_CRITIQUE}) + "\n")
    out = os.path.join(str(root), "critic")
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        result = train("sft", dict(model=base, data=data, output_dir=out, max_steps=60, per_device_train_batch_size=4,
                                   learning_rate=3e-2, logging_steps=10, save_steps=0, packing=False,
                                   report_plot=False, max_seq_length=1024), log=lambda *a: None)
    finally:
        torch.set_num_threads(before)
    assert result.metrics["loss"] < 1e-2, f"the critic did not learn its answer: {read_metrics(out)}"
    _CACHE["critic"] = os.path.join(out, "final")
    return _CACHE["critic"]


def build_rft_run(root) -> dict:
    """`train rft` from the critic on rft_examples(): sampling, rejection, 2 SFT steps. Once per process."""
    if "rft" in _CACHE:
        return _CACHE["rft"]
    from grm_engine.demo import write_jsonl
    from grm_engine.train import train

    critic = build_critic(root)
    data = write_jsonl(os.path.join(str(root), "rft_examples.jsonl"), rft_examples())
    out = os.path.join(str(root), "rft")
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        result = train("rft", dict(model=critic, data=data, output_dir=out, num_generations=3, temperature=1.0,
                                   max_completion_length=16, max_steps=2, per_device_train_batch_size=2,
                                   learning_rate=1e-4, logging_steps=1, save_steps=0, report_plot=False,
                                   seed=0), log=lambda *a: None)
    finally:
        torch.set_num_threads(before)
    _CACHE["rft"] = {"critic": critic, "data": data, "output_dir": out, "result": result}
    return _CACHE["rft"]
