"""`grm-engine eval`'s numbers, the way the paper reports them (METHOD.md, "Evaluation"), its tables and plot.

Per benchmark (the --data format; several files of one format are one benchmark):
  rewardbench  accuracy per subset, the four sections weighted by example counts (allenai's leaderboard
               constants by default, REWARDBENCH_LEADERBOARD_COUNTS; the dataset's true counts on request),
               score = the plain mean of the four sections
  ppe          PPE-Pref = accuracy over the human-preference rows; PPE-Correct = the plain mean of the
               correctness sets' per-domain accuracies (domain: the row's subset/domain, else the file name)
  rmb          the four cells helpfulness/harmlessness x pairwise/best-of-N (goal: the category path, else the
               file path), score = their plain mean; best-of-N = the argmax over all responses is the best
  realmistake  ROC-AUC of the score (greedy) or of the k samples' scores summed (Voting@k, MetaRM@k) against
               "no error": an example whose samples do not all parse is ranked by the mean of its parsed scores
               (the same ranking as the sum when every sample parses); an example with none is left out, counted
  jsonl        accuracy (and per subset)
Overall = the plain mean of RewardBench, PPE-Pref, PPE-Correct and RMB when all four are given.
Every accuracy uses one tie policy (eval's default "random": the paper's shuffle-and-argmax protocol, seeded)
and is printed with its tie rate: the share of examples whose top total was tied, which that policy decided.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from .data import FORMATS
from .metrics import (PAPER_BENCHMARKS, REWARDBENCH_EXAMPLE_COUNTS, REWARDBENCH_LEADERBOARD_COUNTS, example_credits,
                      overall_score, ppe_correctness_score, rewardbench_scores, rmb_score, roc_auc, top_is_tied)

REWARDBENCH_COUNTS = {"leaderboard": REWARDBENCH_LEADERBOARD_COUNTS, "dataset": REWARDBENCH_EXAMPLE_COUNTS}
REWARDBENCH_COUNTS_NAMES = {"leaderboard": "allenai leaderboard constants (xstest-should-refuse 250, -respond 154)",
                            "dataset": "the dataset's row counts (xstest-should-refuse 154, -respond 250)"}


def parse_data_specs(values, suite: str | None, default_format: str) -> list[tuple[str, str]]:
    """--data PATH[:FORMAT] (repeatable) and --suite FILE (one PATH[:FORMAT] a line, '#' comments, paths relative
    to the suite file) -> [(path, format)]. ValueError names the bad entry."""
    entries = [(value, "--data") for value in values or []]
    if suite:
        try:
            lines = Path(suite).read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--suite {suite}: cannot read it ({e})") from None
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                path, fmt = _split_spec(line, default_format)
                path = path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(suite)), path)
                entries.append((f"{path}:{fmt}", f"--suite {suite}, line {number}"))
    if not entries:
        raise ValueError("no data: give --data PATH[:FORMAT] (repeatable) or --suite FILE")
    specs = []
    for value, where in entries:
        spec = _split_spec(value, default_format)
        if spec in specs:
            raise ValueError(f"{where}: {spec[0]} ({spec[1]}) is given twice")
        specs.append(spec)
    return specs


def _split_spec(value: str, default_format: str) -> tuple[str, str]:
    path, _, suffix = value.rpartition(":")
    if path and suffix in FORMATS:
        return path, suffix
    if path and "/" not in suffix and "." not in suffix and not os.path.exists(value):
        raise ValueError(f"{value}: unknown format {suffix!r} (formats: {', '.join(FORMATS)})")
    return value, default_format


def method_votes(greedy, sampled, ks, *, meta: bool, k_meta) -> dict:
    """{method: {"rows": per-example totals, "used": voted samples per example, "k_meta"?}}: Greedy, Voting@k
    and (with a meta RM) MetaRM@k, each k's votes taken over the first k of the sampled run's samples."""
    def entry(result, vote_result, **extra):
        return {"rows": result.predictions(vote_result), "used": vote_result.used.sum(1).tolist(), **extra}
    methods = {"Greedy": entry(greedy, greedy.vote_first(1))}
    for k in ks:
        methods[f"Voting@{k}"] = entry(sampled, sampled.vote_first(k))
    if meta:
        for k in ks:
            kept = min(k_meta, k) if k_meta else max(1, k // 2)
            methods[f"MetaRM@{k}"] = entry(sampled, sampled.vote_first(k, k_meta=kept, use_meta=True), k_meta=kept)
    return methods


def _group_means(credits, tied, keys) -> dict:
    groups: dict = {}
    for credit, tie, key in zip(credits, tied, keys):
        groups.setdefault(key, []).append((float(credit), bool(tie)))
    return {key: {"accuracy": sum(c for c, _ in v) / len(v), "tie_rate": sum(t for _, t in v) / len(v),
                  "count": len(v)} for key, v in groups.items()}


def _rmb_goal(example) -> str:
    for text in (example.subset or "", example.source or ""):
        lowered = text.lower()
        if "harmless" in lowered:
            return "harmlessness"
        if "helpful" in lowered:
            return "helpfulness"
    raise ValueError(f"RMB example {example.id!r} ({example.source}, line {example.line}): neither its category_path "
                     f"{example.subset!r} nor its file path says Helpfulness or Harmlessness")


def check_benchmark(fmt: str, examples) -> None:
    """Before scoring: what the aggregates need can be read off every example (ValueError names the first)."""
    if fmt == "rmb":
        for example in examples:
            _rmb_goal(example)


def benchmark_methods(fmt: str, examples, methods: dict, *, tie_policy: str, seed: int,
                      rewardbench_counts: str = "leaderboard") -> dict:
    """{method: row} for one benchmark; row["headline"] = {column: value} feeds the summary table."""
    out = {}
    for name, votes in methods.items():
        rows = votes["rows"]
        if fmt == "realmistake":
            means = [row[0] / used if used else math.nan for row, used in zip(rows, votes["used"])]
            auc, unscored = roc_auc(means, [example.label for example in examples])
            out[name] = {"auc": auc, "unscored": unscored, "count": len(examples), "headline": {"ReaLMistake": auc}}
            continue
        credits = example_credits(rows, examples, tie_policy=tie_policy, seed=seed)
        tied = [top_is_tied(row) for row in rows]
        row = {"accuracy": float(credits.mean()), "tie_rate": sum(tied) / len(tied), "count": len(examples),
               "subsets": {str(s): v["accuracy"] for s, v in
                           _group_means(credits, tied, [e.subset for e in examples]).items()}}
        if fmt == "rewardbench":
            row["weights"] = rewardbench_counts
            row["sections"] = rewardbench_scores(row["subsets"], example_counts=REWARDBENCH_COUNTS[rewardbench_counts])
            row["headline"] = {"RewardBench": (row["sections"]["Overall"], row["tie_rate"])}
        elif fmt == "ppe":
            kinds = _group_means(credits, tied, [e.kind for e in examples])
            row["headline"] = {}
            if "ppe-preference" in kinds:
                row["preference"] = kinds["ppe-preference"]
                row["headline"]["PPE-Pref"] = (kinds["ppe-preference"]["accuracy"], kinds["ppe-preference"]["tie_rate"])
            if "ppe-correctness" in kinds:
                chosen = [i for i, e in enumerate(examples) if e.kind == "ppe-correctness"]
                domains = _group_means([credits[i] for i in chosen], [tied[i] for i in chosen],
                                       [examples[i].subset or Path(examples[i].source or "?").stem for i in chosen])
                score = ppe_correctness_score({d: v["accuracy"] for d, v in domains.items()})
                row["correctness"] = {"accuracy": score, "tie_rate": kinds["ppe-correctness"]["tie_rate"],
                                      "count": kinds["ppe-correctness"]["count"], "domains": domains}
                row["headline"]["PPE-Correct"] = (score, kinds["ppe-correctness"]["tie_rate"])
        elif fmt == "rmb":
            cells = _group_means(credits, tied, [f"{_rmb_goal(e)}/{'bon' if e.kind == 'rmb-bon' else 'pairwise'}"
                                                 for e in examples])
            row["cells"] = cells
            row["score"] = rmb_score({c: v["accuracy"] for c, v in cells.items()})
            row["headline"] = {"RMB": (row["score"], row["tie_rate"])}
        else:
            row["headline"] = {f"{fmt} accuracy": (row["accuracy"], row["tie_rate"])}
        if "k_meta" in votes:
            row["k_meta"] = votes["k_meta"]
        out[name] = row
    return out


def summarize(benchmarks: dict) -> dict:
    """{method: {column: value, ..., "Overall": value, "ties": {column: tie rate}}} across benchmarks."""
    summary = {}
    for report in benchmarks.values():
        for method, row in report["methods"].items():
            cell = summary.setdefault(method, {"ties": {}})
            for column, value in row["headline"].items():
                if isinstance(value, tuple):
                    cell[column], cell["ties"][column] = value
                else:
                    cell[column] = value
    for cell in summary.values():
        if all(name in cell for name in PAPER_BENCHMARKS):
            cell["Overall"] = overall_score(cell)
    return summary


def _cell(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def _table(title: str, rows: dict, columns: list, width: int, titles: list | None = None) -> list[str]:
    titles = titles or columns
    widths = [max(9, len(t) + 2) for t in titles]
    lines = [title, "method".ljust(width) + "".join(t.rjust(w) for t, w in zip(titles, widths))]
    for name, values in rows.items():
        lines.append(name.ljust(width) + "".join(_cell(values.get(c)).rjust(w) for c, w in zip(columns, widths)))
    return lines + [""]


def _subset_table(title: str, methods: dict) -> list[str]:
    """One line per subset (there may be dozens), one column per method."""
    subsets = list(next(iter(methods.values()))["subsets"])
    width = max(len(s) for s in subsets + ["subset"]) + 2
    lines = [title, "subset".ljust(width) + "".join(m.rjust(max(9, len(m) + 2)) for m in methods)]
    for subset in subsets:
        lines.append(subset.ljust(width) + "".join(_cell(r["subsets"][subset]).rjust(max(9, len(m) + 2))
                                                   for m, r in methods.items()))
    return lines + [""]


def format_report(benchmarks: dict, summary: dict, *, tie_policy: str, seed: int) -> str:
    """The printout: a summary table (each accuracy with its tie rate), then each benchmark's detail."""
    methods = list(summary)
    width = max(len(m) for m in methods + ["method"]) + 2
    columns = [c for c in (*PAPER_BENCHMARKS, "Overall") if any(c in summary[m] for m in methods)]
    columns += sorted({c for m in methods for c in summary[m] if c not in (*columns, "ties")})
    keys, titles = [], []
    for column in columns:
        keys.append(column)
        titles.append(column)
        if any(column in summary[m]["ties"] for m in methods):
            keys.append(f"{column} ties")
            titles.append("ties")
    rows = {m: {**summary[m], **{f"{c} ties": t for c, t in summary[m]["ties"].items()}} for m in methods}
    policy = f"tie policy: {tie_policy}" + (f" (seed {seed})" if tie_policy == "random" else "")
    lines = _table(f"Summary, % ({policy}; 'ties' = % of examples whose top score was tied, which the policy "
                   "decided)", rows, keys, width, titles)
    for name, report in benchmarks.items():
        first = next(iter(report["methods"].values()))
        head = f"{name}: {report['examples']} examples from {', '.join(report['data'])}"
        if report["format"] == "realmistake":
            lines += _table(f"{head}; ROC-AUC % of the score against 'no error' (unscored examples left out)",
                            {m: {"AUC": r["auc"], "unscored": r["unscored"] / r["count"]}
                             for m, r in report["methods"].items()}, ["AUC", "unscored"], width)
            continue
        detail = {}
        if report["format"] == "rewardbench":
            columns = ["Chat", "Chat Hard", "Safety", "Reasoning", "Overall"]
            head += f"; section weights: {REWARDBENCH_COUNTS_NAMES[first['weights']]}"
            detail = {m: r["sections"] for m, r in report["methods"].items()}
        elif report["format"] == "ppe" and "correctness" in first:
            columns = sorted(first["correctness"]["domains"]) + ["mean"]
            head += "; PPE-Correct per domain"
            detail = {m: {**{d: v["accuracy"] for d, v in r["correctness"]["domains"].items()},
                          "mean": r["correctness"]["accuracy"]} for m, r in report["methods"].items()}
        elif report["format"] == "rmb":
            columns = [c for c in ("helpfulness/pairwise", "helpfulness/bon", "harmlessness/pairwise",
                                   "harmlessness/bon") if c in first["cells"]] + ["mean"]
            head += "; cells (the mean needs all four)"
            detail = {m: {**{c: v["accuracy"] for c, v in r["cells"].items()}, "mean": r["score"]}
                      for m, r in report["methods"].items()}
        if detail:
            lines += _table(head, detail, columns, width)
        if list(first["subsets"]) != ["None"]:
            lines += _subset_table(f"{name} per subset, accuracy %", report["methods"])
    return "\n".join(lines)


def plot(path: str, ks: list[int], summary: dict, title: str) -> str:
    """Accuracy (Overall when all four paper benchmarks are there, else the first column) against k."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    greedy = summary["Greedy"]
    column = "Overall" if greedy.get("Overall") == greedy.get("Overall") and "Overall" in greedy else \
        next(c for c in greedy if c != "ties")
    if greedy[column] != greedy[column]:  # a RewardBench section without data: the plain accuracy instead
        return f"no plot: {column} has no value (a benchmark part without data)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, style in (("Voting", "o-"), ("MetaRM", "s-")):
        points = [(k, 100 * summary[f"{prefix}@{k}"][column]) for k in ks if f"{prefix}@{k}" in summary]
        if points:
            ax.plot(*zip(*points), style, label=prefix if prefix == "Voting" else "MetaRM-guided voting")
    ax.axhline(100 * greedy[column], color="gray", linestyle="--", label="Greedy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (sampled critiques)")
    ax.set_ylabel(f"{column} (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
