"""Training logs people expect: a tqdm bar (rank 0), a metrics jsonl (one line per logged step) and a PNG of the
curves at the end. On resume, lines logged after the checkpoint the run resumes from are dropped, so the file
holds each step once."""
from __future__ import annotations

import json
import math
import os
import time

from .engine import all_reduce_max, all_reduce_sum, is_main, world_size


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def reduce_over_ranks(metrics: dict, device, *, sums=(), maxima=(), already_global=()) -> dict:
    """One rank's step metrics -> the whole step's (collective: every rank calls it with the same keys): keys in
    `sums` are summed over ranks, `maxima` take the largest (wall times), `already_global` stay as they are, and
    every other number becomes the mean over ranks (each rank holds the same number of rows)."""
    if world_size() == 1:
        return dict(metrics)
    numbers = sorted(k for k, v in metrics.items() if k not in already_global and isinstance(v, (int, float)))
    largest = [k for k in numbers if k in maxima]
    added = [k for k in numbers if k not in maxima]
    out = dict(metrics)
    out.update(zip(added, all_reduce_sum([float(metrics[k]) for k in added], device)))
    out.update(zip(largest, all_reduce_max([float(metrics[k]) for k in largest], device)))
    for key in added:
        if key not in sums:
            out[key] /= world_size()
    return out


def truncate_jsonl_after(path: str, step: int) -> None:
    """Drop the lines of a per-step jsonl (metrics, GRPO completions) logged after `step` (a resume continues
    from there), and any line cut by a kill."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, output_dir: str, stage: str, total_steps: int, start_step: int = 0, *, enabled: bool = True):
        self.enabled = enabled and is_main()
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.stage, self.total_steps, self.start_step = stage, total_steps, start_step
        self.bar = None
        self.start_time = time.perf_counter()
        if not self.enabled:
            return
        self._truncate_after(start_step)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=f"train {stage}", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        truncate_jsonl_after(self.path, step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        show = {k: v for k, v in metrics.items() if k in ("loss", "reward_mean", "accuracy", "tokens_per_s", "lr")}
        self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in show.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self, plot: bool = True) -> str | None:
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        return plot_metrics(self.path, os.path.join(os.path.dirname(self.path), "metrics.png"), self.stage) if plot else None


def read_metrics(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows


PLOTTED = ("loss", "grad_norm", "lr", "tokens_per_s", "reward_mean", "accuracy", "kl", "clip_frac", "eval_loss",
           "eval_accuracy", "eval_auc", "completion_length", "zero_advantage_frac")


def plot_metrics(jsonl_path: str, png_path: str, title: str) -> str | None:
    rows = read_metrics(jsonl_path)
    keys = [k for k in PLOTTED if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"grm-engine train {title}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path
