"""The `grm-engine` command (also `python -m grm_engine`): score and eval.

Both check the data file and the checkpoint directories BEFORE any model is loaded (grm_engine/cli_checks.py), then
score the examples in chunks of --chunk-size; `score` (grm_engine/cli_score.py) writes a resumable results file,
`eval` (grm_engine/cli_eval.py) the accuracy table. `train` has its own config system (grm_engine.train.cli).

Several GPUs (grm_engine/parallel.py): under `torchrun --nproc-per-node N` (or with --devices 0,1,..., which runs
torchrun's launcher itself) every rank scores its share of each chunk on its own device and rank 0 writes the
chunk in input order; the results file and its sidecar do not depend on the world size.
"""
from __future__ import annotations

import argparse
import os
import sys

from .cli_checks import UsageError
from .cli_eval import cmd_eval
from .cli_score import cmd_score
from .data import FORMATS
from .parallel import RankFailure, Ranks, launch, parse_devices, report_failure, strip_devices


def _add_common(p: argparse.ArgumentParser, *, several_data: bool = False) -> None:
    p.add_argument("--model", required=True, help="GRM checkpoint directory (config.json + *.safetensors + tokenizer)")
    if several_data:  # eval: several benchmarks in one run, each PATH[:FORMAT]
        p.add_argument("--data", action="append", help="examples: a .jsonl file, a .json list or a directory of "
                       "them, as PATH or PATH:FORMAT (e.g. rb.jsonl:rewardbench); repeat for several benchmarks")
        p.add_argument("--suite", help="a text file listing PATH[:FORMAT] lines (relative to it) to evaluate together")
    else:
        p.add_argument("--data", required=True, help="examples: a .jsonl file, a .json list or a directory of them")
    p.add_argument("--format", default="jsonl", choices=FORMATS, help="row format of --data (default: jsonl)")
    p.add_argument("--skip-invalid", action="store_true", help="drop invalid rows (the count is reported)")
    p.add_argument("--meta-rm", help="meta RM checkpoint directory (enables meta-RM guided voting)")
    p.add_argument("--k-meta", type=int, help="samples kept by the meta RM (default: k // 2)")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=1024, help="longest critique, in tokens")
    p.add_argument("--template", default="default",
                   help="prompt template: default, single (one response, \\boxed{0|1}), a template FILE, or "
                   "single:FILE (see README 'Prompt templates'; scores under another template are not comparable)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the responses in their given order")
    p.add_argument("--chunk-size", type=int, default=256, help="examples per decoder run (default: 256)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--devices", help="several GPUs, data-parallel: comma-separated CUDA indices, e.g. 0,1 (one "
                   "process each; the same as torchrun --nproc-per-node N)")
    p.add_argument("--max-num-seqs", type=int, help="sequences decoded at once (default: 256, or the largest k)")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=0.9)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run Python code from the checkpoint folders (off by default; never asks)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grm-engine", description="Generative reward models, DeepSeek-GRM style.")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score examples with k critiques each; one result line per example",
                                description="Score examples with k sampled critiques (shuffled response order), "
                                "voting and optional meta-RM filtering; resumable.")
    _add_common(score)
    score.add_argument("--k", type=int, default=8, help="critiques per example")
    score.add_argument("--out", required=True, help="results .jsonl; an existing file is resumed")
    ev = commands.add_parser("eval", help="accuracy table and plot: greedy, Voting@k, MetaRM@k",
                             description="Sample once at the largest k, derive every smaller k from the first k "
                             "samples, run greedy separately, print the table, write results.json and a plot.")
    _add_common(ev, several_data=True)
    ev.add_argument("--k", default="1,8,32", help="comma-separated k values (default: 1,8,32)")
    ev.add_argument("--tie-policy", default="random", choices=("strict", "half", "fractional", "random"),
                    help="a tied top score: random = the paper's protocol (shuffle + argmax; seeded by --seed, the "
                    "default), strict = wrong (Eq. 10, the training reward), half, fractional (1/number tied)")
    ev.add_argument("--rewardbench-counts", default="leaderboard", choices=("leaderboard", "dataset"),
                    help="RewardBench section weights: allenai's leaderboard constants (default; what published "
                    "numbers use) or the dataset's true row counts (the two xstest weights swap)")
    ev.add_argument("--out-dir", default="grm_eval", help="where results.json, samples.jsonl and the plot go")
    ev.add_argument("--overwrite", action="store_true", help="replace the results of an earlier eval in --out-dir")
    demo = commands.add_parser("demo", help="the whole method (SFT, RFT, GRPO, meta RM, eval) on a tiny model trained here",
                               description="Train a tiny GRM from scratch on a built-in verifiable task through the "
                               "training stages (sft -> rft -> grpo -> meta-rm), evaluate each stage with `eval` on a "
                               "held-out split and print a table shaped like the paper's Table 2. No download; the "
                               "default preset takes under 10 minutes on 2 CPU cores.")
    demo.add_argument("--out-dir", default="grm_demo", help="where data, checkpoints and results go (a folder an "
                      "earlier demo wrote is replaced)")
    demo.add_argument("--preset", choices=("cpu", "gpu", "test"),
                      help="sizes and step counts (default: gpu with a cuda --device, else cpu; test: about a minute)")
    demo.add_argument("--device", help="cuda or cpu (default: cpu; cuda picks the gpu preset)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (default 1: fastest for this tiny model on a shared machine)")
    commands.add_parser("train", help="train a GRM or meta RM: sft | rft | grpo | meta-rm (grm-engine train -h)",
                        add_help=False)
    return parser


def cmd_demo(args) -> int:
    from .demo import DemoError, run_demo

    device = args.device or "cpu"
    preset = args.preset or ("gpu" if device.startswith("cuda") else "cpu")
    if args.threads < 1:
        raise UsageError("--threads must be >= 1")
    print(f"grm-engine demo: preset {preset} on {device}, seed {args.seed}, everything under {args.out_dir} (no download)")
    try:
        run_demo(args.out_dir, preset, device, seed=args.seed, threads=args.threads)
    except DemoError as e:
        raise UsageError(str(e)) from None
    return 0


def _rerun_hint(args) -> str:
    if args.command == "score":
        return f"; the results so far are in {args.out}, rerun the same command to resume"
    if args.command == "eval":
        return "; rerun the same command (eval starts over; its outputs are written only at the end)"
    return ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher puts --local_rank=N first (`deepspeed -m grm_engine train ...`)
    for token in [t for t in argv if t.startswith(("--local_rank=", "--local-rank="))]:
        os.environ.setdefault("LOCAL_RANK", token.split("=", 1)[1])
        argv.remove(token)
    if argv[:1] == ["train"]:  # training has its own config system (grm_engine.train.cli)
        from .train.cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.ranks = Ranks.from_environment()
        if getattr(args, "devices", None):
            devices = parse_devices(args.devices, args.device, args.ranks.world)
            if len(devices) > 1:  # one process per device under torchrun's launcher, each running this command
                return launch(strip_devices(argv), devices)
            args.device = devices[0]
        args.device = args.ranks.device(args.device)
    except ValueError as e:
        print(f"grm-engine {args.command}: error: {e}", file=sys.stderr)
        return 2
    args.ranks.start()
    try:
        if args.command == "score":
            return cmd_score(args)
        if args.command == "demo":
            return cmd_demo(args)
        return cmd_eval(args)
    except UsageError as e:
        print(f"grm-engine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:
        return report_failure(f"grm-engine {args.command}", args.ranks, e)
    except KeyboardInterrupt:
        if args.ranks.is_main:
            print(f"grm-engine {args.command}: interrupted{_rerun_hint(args)}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a file-size limit, a folder removed mid-run: no traceback, the same advice
        if args.ranks.is_main:
            print(f"grm-engine {args.command}: error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}"
                  f"{_rerun_hint(args)}", file=sys.stderr)
        return 1
    finally:
        args.ranks.close()
