"""SFT step throughput: the plain transformers step (baseline) against grm_engine.train's (ours), same run.

    python3 bench/gpu_sft_baseline.py                       # 0.5B shape: hf, hf_causal, ours
    python3 bench/gpu_sft_baseline.py --shape 7b            # Qwen2.5-7B shape
    python3 bench/gpu_sft_baseline.py --variants hf,ours --ours-deepspeed zero2
    python bench/gpu_sft_baseline.py --tiny                 # CPU smoke test

Issue 11's benchmark: SFT tokens/s and peak memory at the 0.5B and 7B Qwen2.5 shapes (random init),
sequence length 2,048, packed, against a plain transformers forward/backward with PyTorch
cross-entropy. Target: ours >= 1.3x the baseline's tokens/s with <= 1/2 its peak memory.

One step = `--batch` packed rows of `--seq` tokens (micro-batches of `--micro-batch` rows with
gradient accumulation), forward + backward + AdamW step + zero_grad. Each row packs documents of
random lengths (prompt + completion; labels -100 on the prompt part, the loss is on completion
tokens only, as our SFT computes it). Tokens/s counts every packed input position of the step.

Variants (each in its own subprocess: clean peak memory, an OOM kills only its variant):
  hf         model(input_ids, position_ids, labels) -> transformers' ForCausalLMLoss (full logits,
             upcast to fp32, F.cross_entropy); position_ids restart at each document, from which
             transformers builds a block-causal mask, so no document attends to another (what our
             packing computes). AdamW(foreach) from torch. Gradient checkpointing off.
  hf_causal  the same without the per-document positions: plain causal attention over the whole row
             (SDPA's flash path; cheaper attention, different semantics): the baseline's best case.
  ours       grm_engine.train's SFT step: see `ours_init` / `ours_step` below (skipped, with a note,
             until grm_engine.train provides it).
Precision (--precision): bf16 = bf16 weights, grads and AdamW state (default, "bf16" training
without master weights); amp = fp32 weights + AdamW, forward under bf16 autocast (torch AMP, what our
plain engine and HF Trainer(bf16=True) do; at 7B this needs ~16 bytes/param, it may not fit).
Timing: CUDA-synced wall time per step, `--warmup` steps dropped, median of `--steps`;
torch.cuda.max_memory_allocated over the variant (model, grads, optimizer state included).
The JSON goes to --out (default $OUT/sft_baseline.json, else ./sft_baseline.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from gpu import print_table, run_child  # bench/gpu.py (this script's folder is on sys.path)
from grm_engine.train.bench_hooks import SHAPES, qwen2_config, random_model

DEFAULT_BATCH = {"0.5b": (8, 8), "7b": (4, 2), "tiny": (2, 1)}  # (rows per step, rows per micro-batch)
VARIANTS = ["hf", "hf_causal", "ours"]


# ----------------------------------------------------------------------------- shared pieces
def make_batches(args, vocab_size: int, count: int, device) -> list[dict]:
    """`count` steps of packed rows: dict(input_ids, position_ids, labels, target_ids, loss_mask, doc_lens).

    labels: transformers' convention (same positions as input_ids, shifted inside the loss, -100 = ignored);
    target_ids/loss_mask: the next-token targets already shifted (target_ids[t] = input_ids[t+1] within a
    document, loss_mask 1 where it is a completion token), for a fused lm_head + CE that does not shift.
    """
    import torch

    g = torch.Generator().manual_seed(1234)
    hi = min(vocab_size, 151643) - 4
    lo_doc, hi_doc = max(8, args.seq // 16), max(16, args.seq // 2)
    # under torchrun each rank takes its share of the global batch (world x --batch rows, drawn as one process
    # drawing world x --batch rows would): 2 GPUs x --batch 4 see the rows of 1 GPU x --batch 8, in order
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    steps = []
    for _ in range(count):
        rows = []
        for _ in range(args.batch * world):
            ids = torch.randint(1, hi, (args.seq,), generator=g)
            pos = torch.empty(args.seq, dtype=torch.long)
            labels = torch.full((args.seq,), -100, dtype=torch.long)
            targets = torch.zeros(args.seq, dtype=torch.long)
            mask = torch.zeros(args.seq, dtype=torch.bool)
            lens, start = [], 0
            while start < args.seq:
                n = min(int(torch.randint(lo_doc, hi_doc + 1, (1,), generator=g)), args.seq - start)
                prompt = max(1, n // 3)  # >= 1: a document's first token never carries a label
                pos[start:start + n] = torch.arange(n)
                labels[start + prompt:start + n] = ids[start + prompt:start + n]
                # target of position t is token t+1 of the same document, counted when t+1 is a completion token
                targets[start:start + n - 1] = ids[start + 1:start + n]
                mask[start + prompt - 1:start + n - 1] = True
                lens.append(n)
                start += n
            # HF shifts labels inside the loss, across document edges too: a document's first token is
            # a prompt token (-100), so no loss crosses an edge.
            rows.append((ids, pos, labels, targets, mask, lens))
        rows = rows[rank * args.batch:(rank + 1) * args.batch]
        batch = {
            "input_ids": torch.stack([r[0] for r in rows]).to(device),
            "position_ids": torch.stack([r[1] for r in rows]).to(device),
            "labels": torch.stack([r[2] for r in rows]).to(device),
            "target_ids": torch.stack([r[3] for r in rows]).to(device),
            "loss_mask": torch.stack([r[4] for r in rows]).to(device),
            "doc_lens": [r[5] for r in rows],
        }
        steps.append(batch)
    return steps


def micro_batches(batch: dict, rows: int):
    total = batch["input_ids"].shape[0]
    for i in range(0, total, rows):
        yield {k: (v[i:i + rows] if not isinstance(v, list) else v[i:i + rows]) for k, v in batch.items()}


# ----------------------------------------------------------------------------- baseline: plain transformers
def hf_init(args, config, device):
    import torch

    amp = args.precision == "amp"
    dtype = torch.float32 if (amp or device.type == "cpu") else torch.bfloat16
    model = random_model(config, device, dtype).train()
    assert not getattr(model, "is_gradient_checkpointing", False)  # off: a fresh model has it off
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, foreach=device.type == "cuda")
    return {"model": model, "optimizer": optimizer, "amp": amp and device.type == "cuda",
            "causal": args.variant == "hf_causal", "micro": args.micro_batch}


def hf_step(state, batch) -> float:
    """Forward + backward (micro-batches, mean over the step's completion tokens) + AdamW + zero_grad."""
    import contextlib

    import torch

    model, optimizer = state["model"], state["optimizer"]
    total = int((batch["labels"][:, 1:] != -100).sum())
    loss_sum = 0.0
    for mb in micro_batches(batch, state["micro"]):
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if state["amp"] else contextlib.nullcontext()
        with ctx:
            kwargs = {} if state["causal"] else {"position_ids": mb["position_ids"]}
            # num_items_in_batch: transformers' loss sums and divides by the step's token count
            out = model(input_ids=mb["input_ids"], labels=mb["labels"], num_items_in_batch=total, **kwargs)
        out.loss.backward()
        loss_sum += out.loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_sum)


# ============================================================================ OURS (wire-up point)
# The other engineer plugs grm_engine.train's SFT step in here. Contract:
#   grm_engine.train.sft_bench_init(config, args, device) -> state   (builds model + engine; may read
#       args.ours_deepspeed: None | "zero2" | "zero3" | a JSON path, args.precision, args.micro_batch)
#   grm_engine.train.sft_bench_step(state, batch) -> float            (one whole optimizer step on `batch`,
#       the dict of make_batches: input_ids, position_ids, labels, target_ids, loss_mask, doc_lens)
# Until both exist, `ours_init` raises NotImplementedError and the driver skips the variant with a note.
def _grm_train():
    try:
        import grm_engine.train as train
    except ImportError:
        return None
    return train


def ours_init(args, config, device):
    train = _grm_train()
    if train is None or not hasattr(train, "sft_bench_init") or not hasattr(train, "sft_bench_step"):
        raise NotImplementedError("grm_engine.train SFT step not wired yet")
    return train.sft_bench_init(config, args, device)


def ours_step(state, batch) -> float:
    train = _grm_train()
    if train is None or not hasattr(train, "sft_bench_step"):
        raise NotImplementedError("grm_engine.train SFT step not wired yet")
    return float(train.sft_bench_step(state, batch))
# ============================================================================ end of OURS


STEPS = {"hf": (hf_init, hf_step), "hf_causal": (hf_init, hf_step), "ours": (ours_init, ours_step)}


def run_variant(args) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    config = qwen2_config(SHAPES[args.shape])
    init, step = STEPS[args.variant]
    row = {"section": "sft", "case": args.variant, "shape": args.shape, "seq": args.seq, "batch": args.batch,
           "micro_batch": args.micro_batch, "precision": args.precision if cuda else "fp32-cpu",
           "tokens_per_step": args.batch * args.seq, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if args.variant == "ours" and args.ours_deepspeed:
        row["deepspeed"] = args.ours_deepspeed
    try:
        state = init(args, config, device)
    except NotImplementedError as e:
        row["skipped"] = str(e)
        return row
    if cuda:
        torch.cuda.synchronize()
        model_gb = torch.cuda.memory_allocated() / 1e9
    batches = make_batches(args, config.vocab_size, args.warmup + args.steps, device)
    times, losses = [], []
    for batch in batches:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step(state, batch))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    measured = times[args.warmup:]
    step_s = statistics.median(measured)
    row.update({"step_s": step_s, "tok_s": args.batch * args.seq * row["world_size"] / step_s,  # every rank's tokens
                "steps_s": times, "losses": losses,
                "params": sum(p.numel() for p in state["model"].parameters()) if isinstance(state, dict) and "model" in state else None,
                "torch": torch.__version__})
    if cuda:
        row["model_GB"] = model_gb
        row["peak_alloc_GB"] = torch.cuda.max_memory_allocated() / 1e9
        row["peak_reserved_GB"] = torch.cuda.max_memory_reserved() / 1e9
        row["gpu"] = torch.cuda.get_device_name()
    import transformers

    row["transformers"] = transformers.__version__
    return row


# ----------------------------------------------------------------------------- driver
TABLE_COLUMNS = ["case", "shape", "precision", "tokens_per_step", "step_s", "tok_s", "x_hf", "peak_alloc_GB",
                 "mem_vs_hf", "skipped", "error"]  # the JSON holds every field


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, seq 128")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="packed rows per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward/backward")
    p.add_argument("--precision", default="bf16", choices=["bf16", "amp"])
    p.add_argument("--ours-deepspeed", default=None, help="zero2 | zero3 | JSON path, passed to ours (None: plain)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.shape is None:
        args.shape = "tiny" if args.tiny else "0.5b"
    if args.seq is None:
        args.seq = 128 if args.shape == "tiny" else 2048
    batch, micro = DEFAULT_BATCH[args.shape]
    args.batch = args.batch or batch
    args.micro_batch = args.micro_batch or min(micro, args.batch)
    if args.batch % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide --batch {args.batch}")
    args.steps = args.steps or (2 if args.tiny else 5)
    args.out = args.out or os.path.join(os.environ.get("OUT", "."), "sft_baseline.json")

    if args.variant:  # child
        row = run_variant(args)
        with open(args.child_out, "w") as f:
            json.dump(row, f)
        return 0

    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in STEPS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(STEPS)}")
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", name,
               "--shape", args.shape, "--seq", str(args.seq), "--batch", str(args.batch),
               "--micro-batch", str(args.micro_batch), "--precision", args.precision,
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
        if args.ours_deepspeed:
            cmd += ["--ours-deepspeed", args.ours_deepspeed]
        if args.tiny:
            cmd.append("--tiny")
        start = time.time()
        row, status = run_child(cmd)
        if row is None:
            row = {"section": "sft", "case": name, "shape": args.shape, "error": f"exit {status} (see log; OOM?)"}
        if "skipped" in row:
            print(f"[sft {name}] skipped: {row['skipped']}", flush=True)
        else:
            print(f"[sft {name}] {time.time() - start:.0f} s", flush=True)
        rows.append(row)
        base = next((r for r in rows if r["case"] == "hf" and "tok_s" in r), None)
        for r in rows:
            if base is not None and r is not base and "tok_s" in r:
                r["x_hf"] = r["tok_s"] / base["tok_s"]
                if "peak_alloc_GB" in r and "peak_alloc_GB" in base:
                    r["mem_vs_hf"] = r["peak_alloc_GB"] / base["peak_alloc_GB"]
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 writes (every rank's row holds global numbers)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:  # after every variant, so a later crash keeps what ran
                json.dump({"bench": "sft_baseline", "rows": rows}, f, indent=1)
    print()
    print_table(rows, TABLE_COLUMNS)
    print(json.dumps({"out": args.out, "failed": [r["case"] for r in rows if "error" in r],
                      "skipped": [r["case"] for r in rows if "skipped" in r]}))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
