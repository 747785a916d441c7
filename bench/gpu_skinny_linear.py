"""The split-K skinny linear (kernels/skinny_linear.py) against cuBLAS at decode sizes, and what it does to the
0.5B decode step at the GRPO rollout shape (bench/RESULTS.md, GPU session 6: the small-batch decode step).

1. table: each Qwen2.5-0.5B / 7B projection W [N, K] at M = 16, 32, 64, 128 rows, bf16: cuBLAS
   (torch.matmul(x, w.t(), out=y), as bench/gpu_rollout_step.py's linear_us) and skinny_linear (default config),
   each timed as a CUDA graph of 50 calls (launch gaps inside a graph count, host launch cost does not): us per
   call, GB/s of weight read and the weight-read floor at 4.2 TB/s.
2. sweep: block_n x split_k (block_k as the default's), then warps / stages around the best, for the 0.5B shapes
   at 64 and 128 rows, then the 7B shapes at 64; stops after SWEEP_BUDGET_S. One row per shape: best vs default;
   the summary lists the winners as lines to paste into kernels/skinny_linear.py's TUNED.
3. rollout: the 0.5B GRPO rollout (8 prompts x 512 tokens, n = 8, 256 new tokens, ignore_eos) with
   skinny_linear off and on: decode step ms each (bench/gpu_rollout_step.py's measurement).

Predicted before any measurement (H200, M = 64): qkv ~3.0 us (cuBLAS 3.93), o ~3.0 (3.90), gate_up ~5.3 (6.04),
down ~4.3 (7.58, cuBLAS's split-K + reduce kernel); a layer ~15.6 us instead of 21.5, so ~0.14 ms less per step
(1.33 -> ~1.19 ms). At M = 128 gate_up is no faster (x re-reads and tensor work grow with M); down still is.
    python3 bench/gpu_skinny_linear.py [--skip-sweep] [--skip-rollout]   # after bench/gpu_run.sh built the package
    python3 bench/gpu_skinny_linear.py --smoke                            # CPU, interpreter: the script's logic only
JSON lines on stdout and in $OUT/skinny_linear.jsonl; the last line is the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_rollout_step  # noqa: E402  (the rollout setup, the 0.5B projection shapes, the CUDA-graph timer)
from gpu_rollout_step import replay_us  # noqa: E402

OUT = os.environ.get("OUT", ".")
BANDWIDTH = 4.2e12  # bytes/s, the measured device copy ceiling (DESIGN.md)
SHAPES = {**{name: nk for name, nk in gpu_rollout_step.LINEARS.items() if name != "lm_head"},  # 0.5B
          "qkv_7b": (4608, 3584), "o_7b": (3584, 3584), "gate_up_7b": (37888, 3584), "down_7b": (3584, 18944)}
ROWS = (16, 32, 64, 128)
SWEEP_BUDGET_S = 60.0
SWEEP_ORDER = [(name, 64) for name in ("qkv", "o", "gate_up", "down")] + \
              [(name, 128) for name in ("qkv", "o", "gate_up", "down")] + \
              [(name, 64) for name in ("qkv_7b", "o_7b", "gate_up_7b", "down_7b")]
ROWS_FILE = None


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if ROWS_FILE is not None:
        ROWS_FILE.write(line + "\n")
        ROWS_FILE.flush()


def operands(rows: int, n: int, k: int, device: str, dtype: torch.dtype):
    x = torch.randn(rows, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
    return x, w, torch.empty(rows, n, device=device, dtype=dtype)


def skinny_call(x, w, config=None):
    """One launch (the output is allocated inside, from the graph's pool when captured, as in the decoder)."""
    from grm_engine.kernels.skinny_linear import skinny_linear_triton

    return lambda: skinny_linear_triton(x, w, None, config)


def table(shapes: dict, rows_list, device: str, dtype: torch.dtype) -> dict:
    """(name, rows) -> {cublas_us, skinny_us}; one JSON row each."""
    from grm_engine.kernels.skinny_linear import choose_config

    results = {}
    for rows in rows_list:
        for name, (n, k) in shapes.items():
            x, w, y = operands(rows, n, k, device, dtype)
            cublas = replay_us(lambda: torch.matmul(x, w.t(), out=y))
            ours = replay_us(skinny_call(x, w))
            ref = torch.matmul(x.float(), w.float().t())
            error = (skinny_call(x, w)().float() - ref).abs().max().item()
            floor = n * k * w.element_size() / BANDWIDTH * 1e6
            results[name, rows] = dict(cublas_us=cublas, skinny_us=ours)
            emit({"section": "skinny_table", "name": name, "m": rows, "n": n, "k": k, "cublas_us": round(cublas, 2),
                  "skinny_us": round(ours, 2), "speedup": round(cublas / ours, 3), "floor_us": round(floor, 2),
                  "cublas_GB/s": round(n * k * 2 / cublas / 1e3), "skinny_GB/s": round(n * k * 2 / ours / 1e3),
                  "config": choose_config(rows, n, k, num_sms()).__dict__, "max_abs_error": error})
    return results


def num_sms() -> int:
    from grm_engine.kernels.skinny_linear import _num_sms

    return _num_sms(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def sweep_candidates(rows: int, n: int, k: int):
    """block_n x split_k at the default's block_k, warps 4, stages 3; splits the launcher would balance to the same
    launch, or with a tail far past the default's cap, are left out."""
    from grm_engine.kernels.skinny_linear import TAIL_ELEMENTS, SkinnyConfig, balanced_split, block_rows, default_config

    block_k = default_config(rows, n, k).block_k
    seen = set()
    for block_n in (32, 64, 128):
        for split_k in (1, 2, 3, 4, 6, 8, 12, 16):
            split, _ = balanced_split(split_k, k, block_k)
            if (block_n, split) in seen or split * block_rows(rows) * block_n > 4 * TAIL_ELEMENTS:
                continue
            seen.add((block_n, split))
            yield SkinnyConfig(block_n, block_k, split, 4, 3)


def sweep(device: str, dtype: torch.dtype, budget_s: float, order=SWEEP_ORDER) -> list[dict]:
    from dataclasses import replace

    from grm_engine.kernels.skinny_linear import default_config

    start, best_rows = time.perf_counter(), []
    for name, rows in order:
        n, k = SHAPES[name]
        x, w, y = operands(rows, n, k, device, dtype)
        default = default_config(rows, n, k, num_sms())
        timed = {default: replay_us(skinny_call(x, w, default))}
        candidates = list(sweep_candidates(rows, n, k))
        for config in candidates:
            if time.perf_counter() - start > budget_s:
                break
            if config not in timed:
                try:
                    timed[config] = replay_us(skinny_call(x, w, config))
                except Exception as exc:  # e.g. out of shared memory for the widest tiles
                    emit({"section": "skinny_sweep_error", "name": name, "m": rows, "config": config.__dict__,
                          "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        best = min(timed, key=timed.get)
        for warps, stages in ((2, 3), (8, 3), (4, 2), (4, 4)):  # around the best launch
            if time.perf_counter() - start > budget_s:
                break
            config = replace(best, num_warps=warps, num_stages=stages)
            try:
                timed[config] = replay_us(skinny_call(x, w, config))
            except Exception as exc:
                emit({"section": "skinny_sweep_error", "name": name, "m": rows, "config": config.__dict__,
                      "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        best = min(timed, key=timed.get)
        row = {"section": "skinny_sweep", "name": name, "m": rows, "tried": len(timed), "of": len(candidates) + 5,
               "best": best.__dict__, "best_us": round(timed[best], 2), "default": default.__dict__,
               "default_us": round(timed[default], 2)}
        emit(row)
        best_rows.append(row)
        if time.perf_counter() - start > budget_s:
            emit({"section": "skinny_sweep_stopped", "after_s": round(time.perf_counter() - start, 1),
                  "left": [f"{nm}@{m}" for nm, m in order[order.index((name, rows)) + 1:]]})
            break
    return best_rows


def tuned_entry(row: dict) -> str:
    """A sweep row whose best launch beats the default by 3%+, as a line for kernels/skinny_linear.py's TUNED."""
    from grm_engine.kernels.skinny_linear import block_rows

    n, k = SHAPES[row["name"]]
    fields = ", ".join(f"{key}={value}" for key, value in row["best"].items())
    return f"({n}, {k}, {block_rows(row['m'])}): SkinnyConfig({fields}),  # {row['name']} M={row['m']}: " \
           f"{row['best_us']} vs {row['default_us']} us"


def rollout(flag: bool) -> tuple[dict, list[list[int]]]:
    """The GRPO rollout shape of bench/gpu_rollout_step.py (8 prompts of 512 tokens x 8 samples, 256 new tokens)
    -> (its JSON row, every sample's tokens)."""
    model, decoder, prompts = gpu_rollout_step.rollout_setup(8, skinny_linear=flag)
    row, outputs = gpu_rollout_step.timed_rollout(decoder, prompts)
    row = {"section": "skinny_rollout", "skinny_linear": flag, **row,
           **{key: round(row[key], 3) for key in ("generate_s", "decode_s", "prefill_s")},
           "decode_step_ms": round(row["decode_step_ms"], 4)}
    tokens = [s.token_ids for r in outputs for s in r.outputs]
    del decoder, model
    torch.cuda.empty_cache()
    return row, tokens


def main() -> None:
    global ROWS_FILE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-rollout", action="store_true")
    parser.add_argument("--sweep-budget-s", type=float, default=SWEEP_BUDGET_S)
    parser.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes, no rollout")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    ROWS_FILE = open(os.path.join(OUT, "skinny_linear.jsonl"), "a")
    if args.smoke:
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs on a CPU-only machine with TRITON_INTERPRET=1")
        SHAPES.update(tiny=(48, 40), tiny_split=(40, 300))
        results = table({"tiny": SHAPES["tiny"], "tiny_split": SHAPES["tiny_split"]}, (3, 16), "cpu", torch.float32)
        best = sweep("cpu", torch.float32, 5.0, order=[("tiny_split", 16)])
        emit({"section": "skinny_summary", "smoke": True, "cases": len(results),
              "tuned_entries": [tuned_entry(row) for row in best]})
        return
    emit({"section": "skinny_device", "gpu": torch.cuda.get_device_name(), "sms": num_sms(),
          "torch": torch.__version__})
    results = table(SHAPES, ROWS, "cuda", torch.bfloat16)
    best = sweep("cuda", torch.bfloat16, args.sweep_budget_s) if not args.skip_sweep else []
    summary = {"section": "skinny_summary"}
    for rows in (64, 128):
        layer = {path: sum(results[name, rows][path] for name in ("qkv", "o", "gate_up", "down"))
                 for path in ("cublas_us", "skinny_us")}
        summary[f"layer_05b_m{rows}"] = {k: round(v, 2) for k, v in layer.items()}
        summary[f"step_saving_ms_m{rows}_24_layers"] = round(24 * (layer["cublas_us"] - layer["skinny_us"]) / 1e3, 3)
    summary["sweep_shapes"] = len(best)
    summary["tuned_entries"] = [tuned_entry(row) for row in best if row["best_us"] < 0.97 * row["default_us"]]
    if not args.skip_rollout:
        off, tokens_off = rollout(False)
        emit(off)
        on, tokens_on = rollout(True)
        emit(on)
        same = sum(a == b for a, b in zip(tokens_off, tokens_on))
        summary.update(decode_step_ms_off=off["decode_step_ms"], decode_step_ms_on=on["decode_step_ms"],
                       step_speedup=round(off["decode_step_ms"] / on["decode_step_ms"], 3),
                       identical_samples=f"{same}/{len(tokens_off)}")
    emit(summary)


if __name__ == "__main__":
    main()
