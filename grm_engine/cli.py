"""The `grm-engine` command (also `python -m grm_engine`): score and eval.

Both check the data file and the checkpoint directories BEFORE any model is loaded, then score the examples
in chunks of --chunk-size (one decoder run per chunk: continuous batching across the chunk's examples and
samples; chunks bound memory and give resumable progress). `score` appends one JSON line per example after
each chunk (whole lines, flushed), so an interrupted run leaves a valid file and a rerun with the same --out
skips the ids already written. grm_engine/results_file.py guards the file: a sidecar FILE.meta.json records the
run that produced it (a resume that differs is refused) and is locked while a run writes; a file that is not ours
is never touched. A partly written chunk is scored again whole and only its missing ids are written. A
sample's permutation and sampling noise are keyed by (seed, example id, ...), not by its position in a run, its
chunk or its process, so a resume (at any world size) writes the samples an uninterrupted run would have written;
only a different batch composition can change a token, through floating-point rounding on the GPU.

Several GPUs (grm_engine/parallel.py): under `torchrun --nproc-per-node N` (or with --devices 0,1,..., which runs
torchrun's launcher itself) every rank scores its share of each chunk on its own device and rank 0 writes the
chunk in input order; the results file and its sidecar do not depend on the world size.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

from .data import DataError, load_examples
from .parallel import RankFailure, Ranks, launch, parse_devices, report_failure, strip_devices
from .results_file import ResultsFileError, check_output_path, open_results, run_record

FORMATS = ("jsonl", "rewardbench", "ppe", "rmb", "realmistake")


class UsageError(Exception):
    """A problem with the command line or its files, reported as `error: ...` with exit status 2."""
    exit_status = 2


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


# ---- checks before any model is loaded ----
def _load_data(args):
    try:
        examples = load_examples(args.data, format=args.format, skip_invalid=args.skip_invalid)
    except DataError as e:
        raise UsageError(f"bad data: {e}") from None
    if examples.skipped:
        print(f"skipped {examples.skipped} invalid rows (first: {examples.errors[0]})", file=sys.stderr)
    return examples


def _check_inputs(args, k_max: int):
    from .grm import check_checkpoint_dir
    from .meta_rm import check_meta_rm_dir
    from .preflight import PreflightError, check_prompt_lengths, check_run_options

    if args.k_meta is not None and not args.meta_rm:
        raise UsageError("--k-meta needs --meta-rm")
    try:
        check_run_options(args, k_max)
    except PreflightError as e:
        raise UsageError(str(e)) from None
    examples = _load_data(args)
    first_seen = {}
    for example in examples:  # ids key the results file (resume) and the sampling seeds
        if example.id in first_seen:
            raise UsageError(f"bad data: {example.source}, line {example.line}: id {example.id!r} repeats the id at "
                             f"line {first_seen[example.id]}; results are keyed by id, so ids must be unique")
        first_seen[example.id] = example.line
    try:
        check_checkpoint_dir(args.model, trust_remote_code=args.trust_remote_code)
        if args.meta_rm:
            check_meta_rm_dir(args.meta_rm)
        kept, dropped = check_prompt_lengths(args.model, examples, template=args.template, k=k_max, seed=args.seed,
                                             shuffle=not args.no_shuffle, trust_remote_code=args.trust_remote_code,
                                             skip_invalid=args.skip_invalid)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if dropped:
        print(f"skipped {len(dropped)} examples whose prompt does not fit the context (first: {dropped[0]})",
              file=sys.stderr)
        examples[:] = kept
        examples.skipped += len(dropped)
        if not examples:
            raise UsageError(f"bad data: {args.data}: no example fits the model context")
    return examples


def _load_grm(args):
    import torch

    from .grm import GRM
    from .preflight import max_num_seqs

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return GRM.from_pretrained(args.model, meta_rm=args.meta_rm, template=args.template, dtype=dtype,
                               device=args.device, max_num_seqs=max_num_seqs(args),
                               kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                               trust_remote_code=args.trust_remote_code)


def score_in_chunks(grm, examples, args, *, k, temperature, k_meta=None, chunks=None, desc="score"):
    """Yield (chunk examples, ScoreResult) per chunk, with a progress bar in examples/s and tokens/s. Several
    ranks: each scores its share of the chunk; rank 0 gets the chunk's result in input order, the others None."""
    from tqdm.auto import tqdm

    ranks = args.ranks
    size = args.chunk_size
    chunks = chunks if chunks is not None else [examples[i:i + size] for i in range(0, len(examples), size)]
    bar = tqdm(total=sum(len(c) for c in chunks), desc=desc, unit="ex", dynamic_ncols=True, file=sys.stderr,
               disable=not ranks.is_main)
    tokens, start = 0, time.perf_counter()
    try:
        for chunk in chunks:
            result = ranks.score(chunk, lambda shard: grm.score(
                shard, k=k, k_meta=k_meta, temperature=temperature, shuffle=not args.no_shuffle, seed=args.seed,
                max_tokens=args.max_tokens,
                progress=ranks.is_main and sys.stderr.isatty()))  # the decoder's per-sample bar inside a chunk
            if result is None:  # not rank 0
                yield chunk, None
                continue
            tokens += result.generated_tokens
            bar.update(len(chunk))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s")
            yield chunk, result
    finally:
        bar.close()


# ---- score ----
def _run_settings(args) -> dict:
    return {"k": args.k, "k_meta": args.k_meta, "temperature": args.temperature, "seed": args.seed,
            "shuffle": not args.no_shuffle, "template": args.template, "max_tokens": args.max_tokens,
            "chunk_size": args.chunk_size}


def cmd_score(args) -> int:
    ranks, lock = args.ranks, None
    try:
        with ranks.together():  # a check that fails on any rank stops every rank before a model loads
            if args.k < 1:
                raise UsageError("--k must be >= 1")
            try:
                if ranks.is_main:
                    check_output_path(args.out, args.data)
                examples = _check_inputs(args, args.k)
                settings = _run_settings(args)
                done = set()
                if ranks.is_main:  # rank 0 alone holds the lock and writes the file
                    done, lock = open_results(args.out, run_record(args, settings), settings)
            except ResultsFileError as e:
                raise UsageError(str(e)) from None
        return _score_rest(args, examples, settings, ranks.share(done))
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def _score_rest(args, examples, settings: dict, done: set[str]) -> int:
    """Score the chunks that still lack ids and append their rows (the results file is locked)."""
    ranks = args.ranks
    chunks = [examples[i:i + args.chunk_size] for i in range(0, len(examples), args.chunk_size)]
    todo = [c for c in chunks if any(e.id not in done for e in c)]
    if ranks.is_main:
        print(f"{len(examples)} examples, {len(done)} already in {args.out}, {sum(len(c) for c in todo)} to score "
              f"in {len(todo)} chunks" + (f" on {ranks.world} ranks" if ranks.world > 1 else ""), file=sys.stderr)
    if not todo:
        return 0
    with ranks.together():
        grm = _load_grm(args)
    results = []
    with open(args.out, "a", encoding="utf-8") if ranks.is_main else contextlib.nullcontext() as out:
        for chunk, result in score_in_chunks(grm, examples, args, k=args.k, temperature=args.temperature,
                                             k_meta=args.k_meta, chunks=todo):
            if result is None:  # not rank 0
                continue
            for example in result.examples:
                if example.id in done:
                    continue
                out.write(json.dumps({**example.to_json(), "settings": settings}, ensure_ascii=False) + "\n")
                out.flush()
            os.fsync(out.fileno())
            results.append(result)
    if not ranks.is_main:
        return 0
    stats = results[0].concat(results).stats()
    print(json.dumps({"out": args.out, **stats}))
    return 0


# ---- eval ----
def _finite(value):
    """JSON has no NaN: a missing accuracy (e.g. a RewardBench section without data) becomes null."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


EVAL_OUTPUTS = ("results.json", "samples.jsonl", "accuracy_vs_k.png")


def _check_eval_out_dir(out_dir: str, overwrite: bool) -> None:
    """Before any model loads: --out-dir is (or can be made) a writable folder without an earlier eval's results,
    unless --overwrite."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out-dir {out_dir} exists and is not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=out_dir, prefix=".grm-engine-write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out-dir {out_dir}: cannot write there ({e.strerror})") from None
    earlier = [name for name in EVAL_OUTPUTS if os.path.exists(os.path.join(out_dir, name))]
    if earlier and not overwrite:
        raise UsageError(f"--out-dir {out_dir} already holds {', '.join(earlier)} from an earlier eval; pass "
                         "--overwrite to replace them, or give another --out-dir")


def _write_atomically(path: str, text: str) -> None:
    """A reader (or a crash) sees the old file or the new one, never half of one."""
    handle, temp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".grm-engine-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def cmd_eval(args) -> int:
    ranks = args.ranks
    with ranks.together():  # a check that fails on any rank stops every rank before a model loads
        try:
            ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
        except ValueError:
            raise UsageError(f"--k {args.k!r}: give comma-separated integers, e.g. 1,8,32") from None
        if not ks or ks[0] < 1:
            raise UsageError(f"--k {args.k!r}: every k must be >= 1")
        if args.k_meta is not None and args.k_meta < 1:
            raise UsageError("--k-meta must be >= 1")
        benchmarks = _load_benchmarks(args, ks[-1])
        examples = [e for entry in benchmarks.values() for e in entry["examples"]]
        if ranks.is_main:
            _check_eval_out_dir(args.out_dir, args.overwrite)
    with ranks.together():
        grm = _load_grm(args)
    from .grm import ScoreResult

    greedy = [r for _, r in score_in_chunks(grm, examples, args, k=1, temperature=0.0, desc="greedy")]
    sampled = [r for _, r in score_in_chunks(grm, examples, args, k=ks[-1], temperature=args.temperature,
                                             k_meta=min(args.k_meta, ks[-1]) if args.k_meta else None,
                                             desc=f"k={ks[-1]}")]
    if not ranks.is_main:  # rank 0 has every chunk's result, in input order
        return 0
    greedy, sampled = ScoreResult.concat(greedy), ScoreResult.concat(sampled)
    report = _eval_report(args, grm, ks, benchmarks, greedy, sampled)
    # samples.jsonl (the largest) first: a write cut there leaves no output, and a results.json means both exist
    fmt_of = [fmt for fmt, entry in benchmarks.items() for _ in entry["examples"]]
    _write_atomically(os.path.join(args.out_dir, "samples.jsonl"),
                      "".join(json.dumps({**example.to_json(), "benchmark": fmt}, ensure_ascii=False) + "\n"
                              for example, fmt in zip(sampled.examples, fmt_of)))
    _write_atomically(os.path.join(args.out_dir, "results.json"),
                      json.dumps(_finite(report), indent=1, allow_nan=False))
    print()
    for name, run in (("greedy", greedy), (f"k={ks[-1]}", sampled)):
        print(f"{name}: parse failures {run.parse_failures} of {run.num_samples} samples, "
              f"{run.generated_tokens} tokens, {run.tokens_per_second:.0f} tok/s")
    from .evaluation import plot

    plot_title = f"{', '.join(benchmarks)}, tie policy: {args.tie_policy}"
    print(plot(os.path.join(args.out_dir, "accuracy_vs_k.png"), ks, report["summary"], plot_title))
    print(f"results: {os.path.join(args.out_dir, 'results.json')}")
    return 0


def _load_benchmarks(args, k_max: int) -> dict:
    """--data PATH[:FORMAT] entries and --suite lines -> {format: {"data", "examples", "skipped"}}, each file checked
    as `score` checks its --data (several files of one format are one benchmark)."""
    from .evaluation import check_benchmark, parse_data_specs

    try:
        specs = parse_data_specs(args.data, args.suite, args.format)
    except ValueError as e:
        raise UsageError(str(e)) from None
    benchmarks = {}
    for path, fmt in specs:
        examples = _check_inputs(argparse.Namespace(**{**vars(args), "data": path, "format": fmt}), k_max)
        labelled = next((e for e in examples if e.label is not None), None)
        if labelled is not None and k_max > 1 and fmt != "realmistake":
            # Eq. 10 for one response compares its one score with the label; a sum of k votes is not a score.
            raise UsageError(f"{labelled.source}, line {labelled.line}: example {labelled.id!r} has one response and a "
                             f"label, which only k=1 can evaluate (voting sums k scores); run it with --k 1 (an "
                             "error-detection set in the ReaLMistake format is ranked by ROC-AUC at any k)")
        try:
            check_benchmark(fmt, examples)
        except ValueError as e:
            raise UsageError(f"bad data: {e}") from None
        entry = benchmarks.setdefault(fmt, {"data": [], "examples": [], "skipped": 0})
        entry["data"].append(path)
        entry["examples"] += examples
        entry["skipped"] += examples.skipped
    return benchmarks


def _eval_report(args, grm, ks, benchmarks: dict, greedy, sampled) -> dict:
    """Per-benchmark methods (grm_engine/evaluation.py), the summary with Overall, the printout; -> results.json."""
    from .evaluation import benchmark_methods, format_report, method_votes, summarize

    votes = method_votes(greedy, sampled, ks, meta=bool(args.meta_rm), k_meta=args.k_meta)
    reports, start = {}, 0
    for fmt, entry in benchmarks.items():
        stop = start + len(entry["examples"])
        part = {m: {**v, "rows": v["rows"][start:stop], "used": v["used"][start:stop]} for m, v in votes.items()}
        reports[fmt] = {"data": entry["data"], "format": fmt, "examples": len(entry["examples"]),
                        "skipped": entry["skipped"],
                        "methods": benchmark_methods(fmt, entry["examples"], part, tie_policy=args.tie_policy,
                                                     seed=args.seed, rewardbench_counts=args.rewardbench_counts)}
        start = stop
    summary = summarize(reports)
    print()
    print(format_report(reports, summary, tie_policy=args.tie_policy, seed=args.seed))
    report = {"model": args.model, "meta_rm": args.meta_rm, "template": grm.template.spec,
              "template_sha256": grm.template.sha256, "data": [p for e in benchmarks.values() for p in e["data"]],
              "examples": start, "tie_policy": args.tie_policy, "rewardbench_counts": args.rewardbench_counts, "k": ks,
              "temperature": args.temperature, "seed": args.seed, "shuffle": not args.no_shuffle,
              "summary": summary, "benchmarks": reports,
              "greedy_run": greedy.stats(), "sampled_run": sampled.stats()}
    if len(reports) == 1:  # one benchmark: its rows at the top level too, as before several were possible
        (fmt, only), = reports.items()
        report.update(format=fmt, skipped=only["skipped"], methods=only["methods"])
    return report


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
