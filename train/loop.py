"""The supervised loop every row-based stage runs (sft, rft's SFT phase, meta-rm): schedule -> micro-batches ->
engine.backward on globally normalized losses -> engine.step -> metrics -> atomic checkpoints -> final export.

Resuming: the schedule is a pure function of (rows, seed, step), so the checkpoint's step is the data cursor;
the model comes from the checkpoint (plain runs load its safetensors, DeepSpeed its own shards), and the
optimizer, scheduler and RNG states are restored, so a killed run continues exactly (bit for bit on a CPU).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field


from .batches import Schedule, check_sliding_window, collate
from .checkpoint import load_training_state, save_checkpoint, save_model
from .config import ConfigError
from .engine import Engine, all_reduce_sum, barrier, init_distributed, is_main, rank, resolve_device, world_size
from .metrics import MetricsLogger


@dataclass
class TrainResult:
    stage: str
    output_dir: str
    model_dir: str  # output_dir/final: a checkpoint GRM / Decoder / MetaRM load as is
    steps: int
    seconds: float
    metrics: dict = field(default_factory=dict)  # the last logged metrics
    extra: dict = field(default_factory=dict)  # stage-specific (RFT counts, meta-RM eval, ...)


def export_final(engine, tokenizer, output_dir: str) -> str:
    """output_dir/final, written to a temporary directory and renamed (collective under ZeRO-3)."""
    final = os.path.join(output_dir, "final")
    tmp = os.path.join(output_dir, ".tmp-final")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    save_model(engine, tokenizer, tmp)
    barrier()
    if is_main():
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return final


def run_supervised(stage: str, config, rows, tokenizer, build_model, micro_loss, count_fn, resume_from: str | None,
                   *, evaluate=None, log=print) -> TrainResult:
    """build_model(path) -> module; micro_loss(module, batch) -> (loss_sum tensor, {metric: sum}) where loss_sum
    sums over the micro-batch's units (tokens or rows); count_fn(row_indices) -> the units of a micro-batch.
    evaluate(engine) -> {metric: value} runs at logging steps and at the end (rank 0 logs it)."""
    init_distributed(config)
    device = resolve_device(config)
    world = world_size()
    schedule = Schedule(rows, config, world)
    total = schedule.total_steps
    path = config.model if (resume_from is None or config.deepspeed) else resume_from
    try:  # from config.json, before any weights load
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        check_sliding_window(model_config, max((len(r) for r in rows), default=0), f"{stage}: data = {config.data!r}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = build_model(path)
    engine = Engine(model, config, total)
    start = 0
    if resume_from is not None:
        start = int(load_training_state(engine, resume_from)["step"])
        log(f"resumed from {resume_from} at step {start}")
    logger = MetricsLogger(config.output_dir, stage, total, start)
    began = time.perf_counter()
    window = {"tokens": 0.0, "seconds": 0.0}
    last_metrics: dict = {}
    try:
        for step in range(start, total):
            tic = time.perf_counter()
            batches = schedule.step_batches(step)
            global_units = sum(count_fn(b) for b in batches)
            mine = batches[rank()::world]
            sums: dict = {}
            tokens = 0
            for i, indices in enumerate(mine):
                batch = collate([rows[j] for j in indices], config.max_seq_length, getattr(config, "packing", True),
                                pad_id=tokenizer.pad_token_id or 0).to(device)
                with engine.autocast():
                    loss_sum, stats = micro_loss(engine.module, batch)
                engine.backward(loss_sum / max(global_units, 1), last=i == len(mine) - 1, name=f"{stage} loss")
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                tokens += batch.num_tokens
            lr = engine.lr()
            grad_norm = engine.step()
            keys = sorted(sums)
            reduced = all_reduce_sum([sums[k] for k in keys] + [tokens], device)
            totals = dict(zip(keys, reduced[:-1]))
            window["tokens"] += reduced[-1]
            window["seconds"] += time.perf_counter() - tic
            logger.advance()
            done = step + 1
            if done % config.logging_steps == 0 or done == total:
                metrics = {"loss": totals.get("loss_sum", 0.0) / max(global_units, 1), "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": window["tokens"] / max(window["seconds"], 1e-9),
                           "epoch": done / schedule.steps_per_epoch}
                for key, value in totals.items():
                    if key != "loss_sum":
                        metrics[key] = value
                if evaluate is not None:
                    metrics.update(evaluate(engine))
                logger.log(done, metrics)
                last_metrics = metrics
                window = {"tokens": 0.0, "seconds": 0.0}
            if config.save_steps and done % config.save_steps == 0 and done < total:
                save_checkpoint(engine, tokenizer, config.output_dir, done, {"stage": stage}, config.save_total_limit)
        save_checkpoint(engine, tokenizer, config.output_dir, total, {"stage": stage, "finished": True},
                        config.save_total_limit)
        final = export_final(engine, tokenizer, config.output_dir)
    finally:
        plot = logger.close(plot=config.report_plot)
    if plot:
        log(f"curves: {plot}")
    return TrainResult(stage, config.output_dir, final, total, time.perf_counter() - began, last_metrics)
