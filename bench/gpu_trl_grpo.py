"""TRL's GRPOTrainer (transformers.generate, no vLLM) as the peer for our GRPO step (issue 12).

    source bench/gpu_setup.sh && python3 bench/gpu_trl_grpo.py                # H200: both variants
    python3 bench/gpu_trl_grpo.py --variants gc --steps 3                      # only TRL's default config
    python bench/gpu_trl_grpo.py --tiny                                        # CPU smoke test, tiny shape

Shape (issue 12): Qwen2.5-0.5B config with random weights, bf16, one GPU; one optimizer step =
8 prompts of 512 tokens x 8 generations (num_generations=8, 64 completions), 256 new tokens with
EOS suppressed (generation_kwargs min_new_tokens = max_new_tokens, so every completion is exactly
256 tokens), beta = 0.08 (TRL loads a frozen reference copy), a constant reward (all advantages 0:
TRL still runs the whole forward/backward), loss_type grpo, lr 1e-6, AdamW (TRL's default).

Variants, each in its own subprocess (clean peak-memory numbers, an OOM kills only its variant):
  gc    TRL's GRPOConfig defaults (gradient_checkpointing=True), as users run it
  nogc  gradient_checkpointing=False (faster if it fits)
Per variant: wall time of each optimizer step (one generation round + reference forward + policy
forward/backward + AdamW), measured between consecutive `on_step_end` callbacks with CUDA synced;
the first `--warmup` steps are dropped, the table gives the median of the rest. The time in
`model.generate` and in the reference model's forward is recorded per step too (wrappers that
synchronize), and torch.cuda.max_memory_allocated / max_memory_reserved over the run.
The JSON goes to --out (default $OUT/trl_grpo.json, else ./trl_grpo.json).

Nothing is downloaded: the tokenizer is a local WordLevel fast tokenizer whose vocabulary is
exactly the model's (ids 0..V-1, "t<id>" words, Qwen's special tokens at their Qwen ids), so a
prompt of N random words is exactly N tokens; model and tokenizer are saved to a temporary folder
and TRL loads policy and reference from it, as from a Hub checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from gpu import print_table, run_child  # noqa: E402 (bench/gpu.py; this script's folder is on sys.path)
from grm_engine.train.bench_hooks import SHAPES as QWEN2_SHAPES  # noqa: E402 (our GRPO benchmark's shapes)

SHAPES = {name: QWEN2_SHAPES[name] for name in ("0.5b", "tiny")}
VARIANTS = {"gc": {"gradient_checkpointing": True}, "nogc": {"gradient_checkpointing": False}}


def default_out(name: str) -> str:
    return os.path.join(os.environ.get("OUT", "."), name)


# ----------------------------------------------------------------------------- model + tokenizer
def build_tokenizer(vocab_size: int):
    """WordLevel fast tokenizer over ids 0..V-1; specials at Qwen's ids when V is Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size > 151645:
        pad_id, bos_id, eos_id = 151643, 151644, 151645  # <|endoftext|>, <|im_start|>, <|im_end|>
    else:
        pad_id, bos_id, eos_id = vocab_size - 3, vocab_size - 2, vocab_size - 1
    specials = {pad_id: "<|endoftext|>", bos_id: "<|im_start|>", eos_id: "<|im_end|>"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    unk_id = 0
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"t{unk_id}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=None,
        unk_token=f"t{unk_id}", padding_side="left", model_max_length=1 << 20,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer, pad_id, bos_id, eos_id


def save_model_and_tokenizer(shape: str, folder: str, dtype_name: str) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = SHAPES[shape]
    tokenizer, pad_id, bos_id, eos_id = build_tokenizer(dims["vocab_size"])
    config = Qwen2Config(**dims, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         hidden_act="silu", pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                         use_cache=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype_name))
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    # The object itself, not AutoTokenizer.from_pretrained(folder): transformers 5 maps model_type
    # qwen2 to Qwen2Tokenizer, which rebuilds a BPE model and drops our WordLevel one.
    return {"params": n_params, "pad_id": pad_id, "eos_id": eos_id, "tokenizer": tokenizer}


def build_dataset(num_rows: int, prompt_tokens: int, vocab_size: int, seed: int = 0):
    """Prompts of exactly `prompt_tokens` words (= tokens), no special ids; a fixed fingerprint."""
    import random

    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    datasets.disable_caching()
    rng = random.Random(seed)
    hi = min(vocab_size, 151643) - 4  # stay clear of the special ids at the top
    prompts = [" ".join(f"t{rng.randrange(1, hi)}" for _ in range(prompt_tokens)) for _ in range(num_rows)]
    table = InMemoryTable(pa.table({"prompt": prompts}))
    # Fingerprinting hashes the data with dill/xxhash, which some pyarrow builds break; we pass one.
    return datasets.Dataset(table, fingerprint=f"grm-trl-grpo-bench-{num_rows}x{prompt_tokens}-{seed}")


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


# ----------------------------------------------------------------------------- one variant (child)
def run_variant(args) -> dict:
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available() and not args.tiny
    dtype_name = "bfloat16" if cuda else "float32"
    variant = VARIANTS[args.variant]
    group = args.prompts * args.generations
    if group % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide {group} completions")
    accum = group // args.micro_batch
    steps = args.warmup + args.steps

    folder = tempfile.mkdtemp(prefix="trl_grpo_model_")
    info = save_model_and_tokenizer(args.shape, folder, dtype_name)
    dataset = build_dataset(args.prompts * steps, args.prompt_tokens, SHAPES[args.shape]["vocab_size"])

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_out_"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=accum,          # steps_per_generation defaults to this: one round/step
        num_generations=args.generations,
        max_completion_length=args.new_tokens,
        # EOS ignored: MinNewTokensLogitsProcessor masks every eos id until max_new_tokens, so all
        # completions have exactly new_tokens tokens (checked below from TRL's logged lengths).
        generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0,
        beta=args.beta,
        loss_type=args.loss_type,
        num_iterations=1,
        learning_rate=1e-6,
        max_steps=steps,
        num_train_epochs=1,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=variant["gradient_checkpointing"],
        model_init_kwargs={"dtype": dtype_name, "attn_implementation": args.attn},
        use_vllm=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )

    step_end: list[float] = []
    gen_s: dict[int, float] = {}
    ref_s: dict[int, float] = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            sync()
            step_end.clear()
            step_end.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            sync()
            step_end.append(time.perf_counter())

    trainer = GRPOTrainer(model=folder, reward_funcs=constant_reward, args=config, train_dataset=dataset,
                          processing_class=info.pop("tokenizer"),
                          callbacks=[StepTimer()])

    def timed(fn, store):
        def wrapper(*a, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            k = len(step_end) - 1  # index of the step in flight (0 = first)
            store[k] = store.get(k, 0.0) + time.perf_counter() - t0
            calls[id(store)][k] = calls[id(store)].get(k, 0) + 1
            return out
        return wrapper

    calls = {id(gen_s): {}, id(ref_s): {}}
    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy.generate = timed(policy.generate, gen_s)
    if trainer.ref_model is not None:
        ref = trainer.accelerator.unwrap_model(trainer.ref_model)
        ref.forward = timed(ref.forward, ref_s)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    durations = [b - a for a, b in zip(step_end, step_end[1:])]
    measured = list(range(args.warmup, len(durations)))
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    lengths = {k: [h.get(f"completions/{k}_length") for h in logs] for k in ("mean", "min", "max")}
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    row = {
        "section": "grpo_peer", "case": f"trl {args.variant}", "shape": args.shape,
        "prompts": args.prompts, "generations": args.generations, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "micro_batch": args.micro_batch, "grad_accum": accum,
        "gradient_checkpointing": variant["gradient_checkpointing"], "beta": args.beta, "loss_type": args.loss_type,
        "step_s": med([durations[i] for i in measured]),
        "generate_s": med([gen_s.get(i, 0.0) for i in measured]),
        "ref_s": med([ref_s.get(i, 0.0) for i in measured]),
        "steps_s": durations, "generate_steps_s": [gen_s.get(i, 0.0) for i in range(len(durations))],
        "ref_steps_s": [ref_s.get(i, 0.0) for i in range(len(durations))],
        "generate_calls": [calls[id(gen_s)].get(i, 0) for i in range(len(durations))],
        "ref_calls": [calls[id(ref_s)].get(i, 0) for i in range(len(durations))],
        "completion_len_min": min((x for x in lengths["min"] if x is not None), default=None),
        "completion_len_max": max((x for x in lengths["max"] if x is not None), default=None),
        "params": info["params"], "dtype": dtype_name, "attn": args.attn,
        "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
    }
    row["rest_s"] = row["step_s"] - row["generate_s"] - row["ref_s"]
    row["rollout_tok_s"] = group * args.new_tokens / row["generate_s"] if row["generate_s"] else None
    if cuda:
        row["peak_alloc_GB"] = torch.cuda.max_memory_allocated() / 1e9
        row["peak_reserved_GB"] = torch.cuda.max_memory_reserved() / 1e9
        row["gpu"] = torch.cuda.get_device_name()
    if row["completion_len_min"] is not None and row["completion_len_min"] != args.new_tokens:
        row["warning"] = f"completion lengths {row['completion_len_min']}..{row['completion_len_max']} != {args.new_tokens}"
    return row


# ----------------------------------------------------------------------------- driver
TABLE_COLUMNS = ["case", "step_s", "generate_s", "ref_s", "rest_s", "rollout_tok_s", "peak_alloc_GB",
                 "peak_reserved_GB", "completion_len_min", "completion_len_max", "error"]  # the JSON holds every field


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 2 prompts x 4 gens, 16+8 tokens")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--variants", default="gc,nogc", help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--generations", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None,
                   help="completions per forward/backward (default: all of them, no accumulation)")
    p.add_argument("--beta", type=float, default=0.08)
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="measured steps after the warm-up")
    p.add_argument("--out", default=None)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)        # child mode
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    tiny = dict(shape="tiny", prompts=2, generations=4, prompt_tokens=16, new_tokens=8, steps=2)
    full = dict(shape="0.5b", prompts=8, generations=8, prompt_tokens=512, new_tokens=256, steps=3)
    for k, v in (tiny if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.micro_batch is None:
        args.micro_batch = args.prompts * args.generations
    args.out = args.out or default_out("trl_grpo.json")

    if args.variant:  # child: one variant, row to --child-out
        row = run_variant(args)
        with open(args.child_out, "w") as f:
            json.dump(row, f)
        return 0

    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", name]
        for k in ("shape", "prompts", "generations", "prompt_tokens", "new_tokens", "micro_batch", "beta",
                  "loss_type", "attn", "warmup", "steps"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if args.tiny:
            cmd.append("--tiny")
        start = time.time()
        print(f"[trl {name}] {' '.join(cmd[2:])}", flush=True)
        row, status = run_child(cmd)
        if row is None:
            row = {"section": "grpo_peer", "case": f"trl {name}", "error": f"exit {status} (see log; OOM?)"}
        print(f"[trl {name}] {time.time() - start:.0f} s", flush=True)
        rows.append(row)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # after every variant, so a later crash keeps what ran
            json.dump({"bench": "trl_grpo", "rows": rows}, f, indent=1)
    print()
    print_table(rows, TABLE_COLUMNS)
    print(json.dumps({"out": args.out, "failed": [r["case"] for r in rows if "error" in r]}))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
