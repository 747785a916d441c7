"""GRPO step benchmark (ours): `grm-engine train grpo`'s step at the issue's shape, random init, no download.

Qwen2.5-0.5B shape (or --shape 7b / tiny), bf16 under DeepSpeed (--deepspeed zero2 | zero3 | none = plain), per GPU:
--prompts 8 prompts of about --prompt-tokens 512 tokens x --gens 8 generations, --new 256 new tokens with EOS
ignored (so every rollout has the same length, as in bench/gpu_trl_grpo.py), beta 0.08. Prints the step time
broken down (rollout, reference, policy forward/backward + optimizer) with floors measured on this GPU:
  rollout floor   = generated tokens / the decoder's measured decode rate is not a floor; we report the
                    weights-read bound instead: decode steps x weight bytes / copy bandwidth
  policy floor    = 6 x params x trained tokens (fwd + bwd) / the measured bf16 matmul rate
  reference floor = 2 x params x tokens / matmul rate
and writes one JSON line per step plus a summary. Several GPUs: `torchrun --nproc-per-node N bench/gpu_grpo.py ...`
(each rank takes its own prompts; ZeRO-3 gathers the policy for the rollout).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time

import torch

from grm_engine.train.bench_hooks import GEMMA2_SHAPES, qwen2_config, random_model
from grm_engine.train.bench_hooks import SHAPES as QWEN2_SHAPES
from grm_engine.train.bench_hooks import model_config as shape_config

# this benchmark's tiny shape has a larger, untied vocabulary than the shared one
SHAPES = {**QWEN2_SHAPES, "tiny": {**QWEN2_SHAPES["tiny"], "vocab_size": 4096, "tie_word_embeddings": False}}


def model_config(name: str):
    return qwen2_config(SHAPES[name]) if name in SHAPES else shape_config(name)
WORDS = [f"w{i}" for i in range(3000)]


def build_tokenizer(path: str, vocab_size: int, seed: int = 0):
    """Byte-level BPE (the GPU reward parser needs byte-level tokens) over the template and synthetic words,
    padded with plain added tokens to the model's vocabulary so every sampled id decodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from grm_engine import build_prompt

    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    corpus = [build_prompt(text(40), [text(60), text(60)]) + " Scores: \\boxed{7, 3}" for _ in range(200)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=min(8000, vocab_size), special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    have = tokenizer.get_vocab_size()
    tokenizer.add_tokens([AddedToken(f"<x{i}>", special=False, normalized=False) for i in range(vocab_size - have)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_examples(tokenizer, count: int, prompt_tokens: int, seed: int):
    """Two-response examples whose prompt is about prompt_tokens tokens (query : responses words ~ 1 : 3)."""
    from grm_engine import build_prompt
    from grm_engine.data import Example

    rng = random.Random(seed)
    examples = []
    words = max(8, prompt_tokens // 4)
    for i in range(count):
        for _ in range(20):  # converges in a few tries; the template alone sets a floor on short prompts
            query = " ".join(rng.choice(WORDS) for _ in range(max(1, words // 4)))
            responses = [" ".join(rng.choice(WORDS) for _ in range(max(1, 3 * words // 8))) for _ in range(2)]
            length = len(tokenizer(build_prompt(query, responses))["input_ids"])
            if abs(length - prompt_tokens) <= prompt_tokens // 20:
                break
            words = max(4, int(words * prompt_tokens / length))
        examples.append(Example(id=f"grpo-bench-{i}", query=query, responses=responses, best=i % 2))
    return examples


def main() -> int:
    args = build_parser().parse_args()
    return run_benchmark(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="0.5b", choices=sorted(SHAPES) + sorted(GEMMA2_SHAPES))
    p.add_argument("--reference", default="copy", choices=["copy", "sharded"],
                   help="the frozen reference: a full copy per GPU, or partitioned by ZeRO-3 (needs --deepspeed zero3)")
    p.add_argument("--zero-init", action="store_true",
                   help="build policy and reference partitioned across the ranks (deepspeed.zero.Init; ZeRO-3): "
                        "no rank holds a whole model (27B)")
    p.add_argument("--deepspeed", default="zero2", help="zero2 | zero3 | none (plain PyTorch, fp32 master + autocast)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per GPU and step")
    p.add_argument("--gens", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--beta", type=float, default=0.08)
    p.add_argument("--micro-tokens", type=int, default=16384, help="max_tokens_per_micro_batch")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None,
                   help="torch.profiler tables of the last step (self CPU and self device time) to this file")
    return p


def profiled_step(run, step: int, path: str, cuda: bool) -> dict:
    """One GRPO step under torch.profiler; writes the op tables (rank 0's, or each rank's with a .rankN suffix)."""
    from torch.profiler import ProfilerActivity, profile

    from grm_engine.train.engine import local_rank, world_size

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        metrics = run.step(step)
    averages = prof.key_averages()
    # kernels only (the table's "Self CUDA time total"): an aten op's self device time repeats its kernels' time
    device_us = sum(e.self_device_time_total for e in averages
                    if e.device_type != torch.autograd.DeviceType.CPU and not e.is_user_annotation)
    with open(path if world_size() == 1 else f"{path}.rank{local_rank()}", "w") as f:
        f.write(f"step {step}: {metrics['step_s']:.3f} s wall, {device_us / 1e6:.3f} s of device kernels "
                f"(rollout {metrics['rollout_s']:.3f}, reference {metrics['reference_s']:.3f}, "
                f"policy {metrics['policy_s']:.3f})\n")
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=45) + "\n")
        f.write(averages.table(sort_by="self_device_time_total", row_limit=30) + "\n")
    return metrics


def run_benchmark(args) -> int:
    from grm_engine.train.config import GRPOConfig
    from grm_engine.train.engine import is_main, local_rank, world_size
    from grm_engine.train.grpo import prepare_grpo

    cuda = torch.cuda.is_available() and "tiny" not in args.shape
    device = torch.device("cuda", local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    config_of_model = model_config(args.shape)
    work = tempfile.mkdtemp(prefix=f"grpo_bench_{local_rank()}_")
    tokenizer = build_tokenizer(work, config_of_model.vocab_size)
    examples = make_examples(tokenizer, args.prompts * world_size() * (args.warmup + args.steps), args.prompt_tokens, 0)
    deepspeed = "" if args.deepspeed == "none" else args.deepspeed
    config = GRPOConfig(model=work, data="bench", output_dir=work, learning_rate=1e-6, beta=args.beta,
                        num_generations=args.gens, per_device_train_batch_size=args.prompts,
                        max_completion_length=args.new, ignore_eos=True, temperature=1.0, deepspeed=deepspeed,
                        device=str(device), dtype="bfloat16" if cuda else "float32", max_steps=args.warmup + args.steps,
                        max_tokens_per_micro_batch=args.micro_tokens, log_completions_steps=0,
                        gradient_checkpointing=args.gradient_checkpointing, lr_scheduler_type="constant",
                        reference=args.reference)
    dtype = torch.bfloat16 if (cuda and deepspeed) else torch.float32
    zero3 = None
    if args.zero_init:
        from grm_engine.train.engine import _fill_auto, init_distributed, resolve_deepspeed_config

        if deepspeed != "zero3":
            raise SystemExit("--zero-init needs --deepspeed zero3")
        init_distributed(config)
        zero3 = _fill_auto(resolve_deepspeed_config(deepspeed), config, dtype)
    tic = time.perf_counter()
    model = random_model(model_config(args.shape), device, dtype, seed=0, zero3_config=zero3)
    reference = (random_model(model_config(args.shape), device, torch.bfloat16 if cuda else torch.float32, seed=0,
                              zero3_config=zero3 if args.reference == "sharded" else None) if args.beta else None)
    run = prepare_grpo(config, examples, model=model, reference=reference, log=lambda m: None)
    setup_s = time.perf_counter() - tic
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for step in range(args.warmup + args.steps):
        if args.profile and step == args.warmup + args.steps - 1:
            metrics = profiled_step(run, step, args.profile, cuda)
        else:
            metrics = run.step(step)
        metrics.pop("_samples", None)
        metrics["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
        metrics["measured"] = step >= args.warmup
        rows.append(metrics)
        if is_main():
            print(f"step {step}: {metrics['step_s']:.2f} s (rollout {metrics['rollout_s']:.2f} incl. gather "
                  f"{metrics['gather_s']:.2f}, reference "
                  f"{metrics['reference_s']:.2f}, policy {metrics['policy_s']:.2f}), peak {metrics['peak_gb']:.1f} GB, "
                  f"{metrics['generated_tokens']} tokens, reward {metrics['reward_mean']:.2f}", flush=True)
    measured = [r for r in rows if r["measured"]]
    params = sum(p.numel() for p in run.engine.module.parameters()) if run.engine.zero_stage != 3 else \
        sum(getattr(p, "ds_numel", p.numel()) for p in run.engine.module.parameters())
    rollout_tokens = args.prompts * args.gens * args.new
    trained_tokens = args.prompts * args.gens * (args.prompt_tokens + args.new)
    summary = {
        "section": "grpo", "case": f"ours {args.deepspeed}", "shape": args.shape, "world_size": world_size(),
        "prompts_per_gpu": args.prompts, "generations": args.gens, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new, "beta": args.beta, "micro_tokens": args.micro_tokens, "params": params,
        "setup_s": setup_s,
        "step_s": statistics.median(r["step_s"] for r in measured),
        "rollout_s": statistics.median(r["rollout_s"] for r in measured),
        "gather_s": statistics.median(r["gather_s"] for r in measured),  # ZeRO-3: inside rollout_s
        "reference_s": statistics.median(r["reference_s"] for r in measured),
        "policy_s": statistics.median(r["policy_s"] for r in measured),
        "peak_gb": max(r["peak_gb"] for r in rows),
        "rollout_tokens": rollout_tokens, "trained_tokens_per_gpu": trained_tokens,
        "policy_tflops_needed": 6 * params * trained_tokens / 1e12,
        "reference_tflops_needed": 2 * params * trained_tokens / 1e12 if args.beta else 0.0,
        "steps": rows,
    }
    if is_main():
        print(json.dumps({k: v for k, v in summary.items() if k != "steps"}))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
