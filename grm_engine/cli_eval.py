"""`grm-engine eval`: sample once at the largest k, derive every smaller k from the first k samples, run greedy
separately, print the accuracy table per benchmark (grm_engine/evaluation.py), write results.json, samples.jsonl
and a plot to --out-dir."""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from .cli_checks import UsageError, check_inputs, load_grm
from .cli_score import score_in_chunks


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
        grm = load_grm(args)
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
        examples = check_inputs(argparse.Namespace(**{**vars(args), "data": path, "format": fmt}), k_max)
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
