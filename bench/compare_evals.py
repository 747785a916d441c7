"""Two `grm-engine eval` output folders of the same command (e.g. 1 and 2 GPUs): how many sampled critiques are
identical, and every accuracy in results.json side by side with its difference.
    python bench/compare_evals.py DIR_A DIR_B [--out report.json]
"""
from __future__ import annotations

import argparse
import json
import os


def numbers(tree, prefix=""):
    """Flatten a results.json subtree to {dotted.path: float} (lists and strings skipped)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(numbers(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix: float(tree)}
    return {}


def compare(dir_a: str, dir_b: str) -> dict:
    results = [json.load(open(os.path.join(d, "results.json"))) for d in (dir_a, dir_b)]
    samples = []
    for d in (dir_a, dir_b):
        with open(os.path.join(d, "samples.jsonl")) as f:
            samples.append([json.loads(line) for line in f])
    a_rows, b_rows = samples
    if [r["id"] for r in a_rows] != [r["id"] for r in b_rows]:
        raise SystemExit("the two evals hold different examples or orders")
    same = total = 0
    for ra, rb in zip(a_rows, b_rows):
        total += len(ra["samples"])
        same += sum(x["text"] == y["text"] for x, y in zip(ra["samples"], rb["samples"]))
    # the summary and, with one benchmark, its methods (every subset / section accuracy and tie rate)
    na, nb = ({"summary": r["summary"], "methods": r.get("methods", {})} for r in results)
    na, nb = numbers(na), numbers(nb)
    diffs = {key: (na[key], nb.get(key)) for key in na if nb.get(key) != na[key]}
    max_diff = max((abs(a - b) for a, b in diffs.values() if b is not None), default=0.0)
    return {"examples": len(a_rows), "samples": total, "identical_samples": same,
            "identical_fraction": same / max(total, 1), "values": len(na),
            "values_differing": len(diffs), "max_diff": max_diff,
            "differing": {k: v for k, v in list(diffs.items())[:40]},
            "summary_a": na, "summary_b": nb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument("--out")
    args = p.parse_args()
    report = compare(args.dir_a, args.dir_b)
    print(json.dumps({k: v for k, v in report.items() if k not in ("summary_a", "summary_b")}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
