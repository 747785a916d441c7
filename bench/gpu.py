"""GPU benchmark suite: one command, one table (ours vs reference vs peers, measured in the same run).

    python bench/gpu.py                      # every section
    python bench/gpu.py --only loss,parse    # some sections
    python bench/gpu.py --out results.json   # where the JSON goes (default: $OUT/bench.json or bench.json)

Each section is a module bench/gpu_<name>.py with `run(args) -> list[dict]`; a row has at least
`section` and `case`, and times in ms (median of CUDA-event timings). The table prints last,
then one JSON line, as nanoGPT does.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SECTIONS = ["ceilings", "loss", "parse", "decode", "cascade", "score", "coldstart", "prefill", "deepseek_v2"]


def measure_ceilings(args) -> list[dict]:
    """Device copy bandwidth (bytes read + written) and bf16 matmul rate, measured now."""
    import torch
    from triton.testing import do_bench

    src = torch.randn(2 * 1024**3 // 4, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    bandwidth = 2 * src.numel() * 4 / (ms * 1e-3)
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    flops = 2 * 8192**3 / (ms_mm * 1e-3)
    return [
        {"section": "ceilings", "case": "device copy", "ours_ms": ms, "GB/s": bandwidth / 1e9},
        {"section": "ceilings", "case": "bf16 matmul 8192^3", "ours_ms": ms_mm, "TFLOP/s": flops / 1e12},
    ]


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """One line per row; columns: the given ones that some row has (default: every key, in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = [c for c in columns if any(c in r for r in rows)]
    widths = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(_fmt(row.get(c, "")).ljust(widths[c]) for c in columns))


def run_child(command: list[str]) -> tuple[dict | None, int]:
    """Run `command --child-out FILE` (one benchmark variant in its own process: clean peak-memory numbers, an OOM
    kills only it) -> (the row it wrote to FILE as JSON, or None if it wrote none; its exit status)."""
    import subprocess
    import tempfile

    handle, child_out = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        status = subprocess.run([*command, "--child-out", child_out]).returncode
        try:
            with open(child_out) as f:
                return json.load(f), status
        except (OSError, ValueError):
            return None, status
    finally:
        os.unlink(child_out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench.json"))
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; the CPU benchmarks are `pytest bench/`", file=sys.stderr)
        return 2
    args.ceilings = {}
    rows: list[dict] = []
    failed = []
    for name in [s.strip() for s in args.only.split(",") if s.strip()]:
        start = time.time()
        try:
            if name == "ceilings":
                section_rows = measure_ceilings(args)
                args.ceilings = {"bandwidth": section_rows[0]["GB/s"] * 1e9, "matmul": section_rows[1]["TFLOP/s"] * 1e12}
            else:
                module = importlib.import_module(f"gpu_{name}")
                section_rows = module.run(args)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        finally:
            torch.cuda.empty_cache()
        rows.extend(section_rows)
        print(f"[{name}] {len(section_rows)} rows in {time.time() - start:.1f} s", flush=True)
        with open(args.out, "w") as f:  # after every section, so a later crash keeps what ran
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print_table(rows)
    print(json.dumps({"rows": len(rows), "failed": failed, "out": args.out}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
