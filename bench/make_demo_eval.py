"""Writes .out/demo_eval (carried to the GPU machine for `bash bench/gpu_multi.sh eval`): the trained GRPO model and
meta RM of a finished `grm-engine demo` run, and `count` held-out examples of the demo task whose words never
occur in that demo's training data (the demo's own eval split has 200; more examples make the 1 vs 2 GPU accuracy
comparison finer).
    grm-engine demo --out-dir /tmp/grm_demo && python bench/make_demo_eval.py /tmp/grm_demo [--count 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from grm_engine.demo_task import make_task_examples, word_of, write_examples_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo_dir")
    p.add_argument("--count", type=int, default=1024)
    p.add_argument("--out", default=".out/demo_eval")
    args = p.parse_args()
    sources = {"model": os.path.join(args.demo_dir, "grpo", "final"),
               "meta_rm": os.path.join(args.demo_dir, "meta_rm", "final")}
    for name, path in sources.items():
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"{path}: no config.json (is {args.demo_dir} a finished demo run?)")
    seen = set()
    for split in ("sft", "rft", "grpo"):
        with open(os.path.join(args.demo_dir, "data", f"{split}.jsonl")) as f:
            seen.update(word_of(json.loads(line)["query"]) for line in f)
    examples = [e for e in make_task_examples(4 * args.count, seed=4242) if word_of(e.query) not in seen][:args.count]
    if len(examples) < args.count:
        raise SystemExit(f"only {len(examples)} unseen examples; ask for fewer")
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists; remove it first")
    os.makedirs(args.out)
    for name, path in sources.items():
        shutil.copytree(path, os.path.join(args.out, name))
    write_examples_jsonl(os.path.join(args.out, "test.jsonl"), examples)
    print(f"{args.out}: model, meta_rm, test.jsonl ({len(examples)} examples)")


if __name__ == "__main__":
    main()
