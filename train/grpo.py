"""`grm-engine train grpo`: online GRPO with the +1/-1 rule reward (METHOD.md, Eq. 10-11), one step:

1. rollouts: per_device_train_batch_size examples x num_generations critiques from our Decoder reading the live
   policy's own parameters (ZeRO-3: gathered for the rollout), response orders shuffled per sample and step;
2. rewards on the device from token ids (train/rollout.py), advantages per group (group_advantages);
3. reference log-probs from a frozen copy of the starting model (old log-probs too when num_iterations > 1),
   through the fused lm_head kernels;
4. the loss through fused_linear_grpo_loss on the policy's last hidden states, micro-batches sized by a token
   budget, every micro-batch's loss scaled by global counts (all micro-batches, all ranks) so that the gradient
   equals the one-batch loss's whatever the accumulation or world size.
A step is gradient_accumulation_steps rollout chunks; the optimizer steps once per step.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..data import DataError, load_examples
from .checkpoint import load_training_state, save_checkpoint
from .config import ConfigError
from .engine import Engine, all_reduce_sum, init_distributed, is_main, rank, resolve_device, world_size
from .loop import TrainResult, export_final
from .grpo_update import Chunk, _clock, accumulate_gradients, make_chunk  # noqa: F401 (Chunk: tests, bench)
from .metrics import MetricsLogger, reduce_over_ranks, truncate_jsonl_after
from .rollout import decode_samples, generate_rollouts, rollout_metrics
from .run_dir import check_model_dir, load_causal_lm, load_dtype, load_tokenizer, prepare_output_dir


# ---------------------------------------------------------------- data
def drop_easy_examples(examples, score_file: str):
    """Drop the examples a model answered correctly in every sample (METHOD.md: the paper removes examples a
    weaker model answered 3/3). score_file: that model's `grm-engine score` output on the same data."""
    import json

    from .rft import _correct

    easy = set()
    with open(score_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                samples = row["samples"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{score_file}, line {number}: not a `grm-engine score` results line") from None
            label = row.get("label_best")
            if samples and label is not None and label >= 0 and all(
                    _correct([s["scores"] for s in samples], [s["status"] for s in samples], [label] * len(samples))):
                easy.add(str(row["id"]))
    return [e for e in examples if str(e.id) not in easy], len(easy)


class PromptSchedule:
    """Examples of each step: epochs of a seeded permutation, prompts_per_step (all ranks) at a time."""

    def __init__(self, num_examples: int, config, world: int):
        self.num_examples, self.config, self.world = num_examples, config, world
        self.per_rank = config.per_device_train_batch_size * config.gradient_accumulation_steps
        self.per_step = self.per_rank * world
        self.steps_per_epoch = num_examples // self.per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{num_examples} examples are fewer than one step needs ({config.per_device_train_batch_size}"
                              f" x {config.gradient_accumulation_steps} accumulation x {world} processes)")
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_train_epochs * self.steps_per_epoch))

    def step_examples(self, step: int) -> list[int]:
        """This rank's example indices of `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.config.seed, epoch, 13]).permutation(self.num_examples)
        chunk = order[within * self.per_step:(within + 1) * self.per_step]
        return [int(i) for i in chunk[rank() * self.per_rank:(rank() + 1) * self.per_rank]]


# ---------------------------------------------------------------- the decoder on the live policy
class LiveDecoder:
    """Our Decoder reading the policy's parameters. ZeRO-0/1/2 (and plain): built once, rebuilt if the parameters'
    storage moved (DeepSpeed initialize / checkpoint load can move it); ZeRO-3: built inside the gather, per step.
    Sized for one rollout chunk (num_kv_blocks), so the KV pool does not take memory training needs."""

    def __init__(self, engine, tokenizer, config, max_prompt_tokens: int):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        chunk_rows = config.per_device_train_batch_size * config.num_generations
        block = 16
        self.num_kv_blocks = chunk_rows * (math.ceil((max_prompt_tokens + config.max_completion_length + 1) / block) + 1)
        self.max_num_seqs = max(chunk_rows, 1)
        self.decoder, self.fingerprint = None, None
        self.gather_s = 0.0  # the last rollout's ZeRO-3 parameter gather and decoder build (0 otherwise)

    def _fingerprint(self):
        return tuple(p.data_ptr() for p in self.engine.module.parameters())

    def _build(self):
        from ..decode import Decoder

        return Decoder.from_pretrained(self.engine.module, tokenizer=self.tokenizer, num_kv_blocks=self.num_kv_blocks,
                                       max_num_seqs=self.max_num_seqs)

    def rollouts(self, examples, vocab, step: int):
        config = self.config
        kwargs = dict(num_generations=config.num_generations, temperature=config.temperature, top_p=config.top_p,
                      max_completion_length=config.max_completion_length, seed=config.seed, step=step,
                      template=config.template, ignore_eos=config.ignore_eos, shuffle=config.shuffle)
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            if self.engine.zero_stage == 3:
                device = self.engine.device
                t0 = _clock(device)
                with self.engine.gathered_parameters():
                    decoder = self._build()
                    self.gather_s = _clock(device) - t0
                    result = generate_rollouts(decoder, self.tokenizer, vocab, examples, **kwargs)
                    del decoder
                return result
            fingerprint = self._fingerprint()
            if self.decoder is None or fingerprint != self.fingerprint:
                self.decoder, self.fingerprint = self._build(), fingerprint
            return generate_rollouts(self.decoder, self.tokenizer, vocab, examples, **kwargs)
        finally:
            module.train(was_training)


# ---------------------------------------------------------------- the loop
@dataclass
class GRPORun:
    """Everything a GRPO step needs, built once (run_grpo's setup; the benchmark drives steps from it)."""
    config: object
    engine: Engine
    reference: torch.nn.Module | None
    live: "LiveDecoder"
    vocab: object
    tokenizer: object
    examples: list
    schedule: PromptSchedule
    device: torch.device
    pad_id: int
    start_step: int
    reference_engine: object = None  # reference = sharded: the DeepSpeed engine that partitions it (kept alive)

    def step(self, step: int) -> dict:
        return grpo_step(self.engine, self.reference, self.live, self.vocab, self.tokenizer, self.examples,
                         self.schedule, step, self.config, self.device, self.pad_id)


def prepare_grpo(config, examples, resume_from=None, log=print, model=None, reference=None) -> GRPORun:
    """Model, frozen reference, engine, the decoder on the live policy. model / reference: already built modules
    (benchmarks build random-init ones); by default both load from config.model (a resumed plain run loads the
    policy from its checkpoint; DeepSpeed restores it from its shards)."""
    from ..protocol import build_prompt, encode_text
    from ..vocab_bytes import VocabBytes

    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    max_prompt = max(len(encode_text(tokenizer, build_prompt(e.query, e.responses, template=config.template,
                                                                  tokenizer=tokenizer))) for e in examples)
    init_distributed(config)
    device = resolve_device(config)
    schedule = PromptSchedule(len(examples), config, world_size())
    if model is None:
        path = config.model if (resume_from is None or config.deepspeed) else resume_from
        model = load_causal_lm(path, config, load_dtype(config, device))
    if config.beta > 0 and reference is None:  # the frozen starting policy (a resumed run rebuilds it from config.model)
        reference = load_causal_lm(config.model, config, torch.bfloat16 if device.type == "cuda" else torch.float32)
    engine = Engine(model, config, schedule.total_steps * config.num_iterations)
    reference_engine = None
    if reference is not None and config.reference == "sharded":
        reference_engine, reference = engine.shard_frozen(reference)
        log(f"reference: partitioned by ZeRO-3 across {world_size()} ranks")
    elif reference is not None:
        reference = reference.to(device).eval().requires_grad_(False)
    start = 0
    if resume_from is not None:
        start = int(load_training_state(engine, resume_from)["step"])
        log(f"resumed from {resume_from} at step {start}")
    vocab = VocabBytes(tokenizer).to(device)
    live = LiveDecoder(engine, tokenizer, config, max_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GRPORun(config, engine, reference, live, vocab, tokenizer, examples, schedule, device, pad_id, start,
                   reference_engine)


def load_grpo_examples(config, log=print) -> list:
    try:
        examples = list(load_examples(config.data))
    except DataError as e:
        raise ConfigError(f"bad data: {e}") from None
    if config.drop_easy:
        examples, dropped = drop_easy_examples(examples, config.drop_easy)
        log(f"grpo: dropped {dropped} examples answered correctly in every sample of {config.drop_easy}")
    return examples


def run_grpo(config, log=print) -> TrainResult:
    import json

    check_model_dir(config.model, trust_remote_code=config.trust_remote_code)
    examples = load_grpo_examples(config, log)
    resume_from = prepare_output_dir(config, "grpo")
    run = prepare_grpo(config, examples, resume_from, log)
    engine, total = run.engine, run.schedule.total_steps
    logger = MetricsLogger(config.output_dir, "grpo", total, run.start_step)
    completions = os.path.join(config.output_dir, "completions.jsonl")
    if is_main():  # a resume replaces the samples logged after its checkpoint, as the metrics
        truncate_jsonl_after(completions, run.start_step)
    began = time.perf_counter()
    last: dict = {}
    try:
        for step in range(run.start_step, total):
            metrics = run.step(step)
            logger.advance()
            done = step + 1
            samples = metrics.pop("_samples", None)
            if done % config.logging_steps == 0 or done == total:
                logger.log(done, metrics)
                last = metrics
            if samples and is_main():
                with open(completions, "a", encoding="utf-8") as f:
                    for s in samples:
                        f.write(json.dumps({"step": done, **s}, ensure_ascii=False) + "\n")
            if config.save_steps and done % config.save_steps == 0 and done < total:
                save_checkpoint(engine, run.tokenizer, config.output_dir, done, {"stage": "grpo"},
                                config.save_total_limit)
        save_checkpoint(engine, run.tokenizer, config.output_dir, total, {"stage": "grpo", "finished": True},
                        config.save_total_limit)
        final = export_final(engine, run.tokenizer, config.output_dir)
    finally:
        plot = logger.close(plot=config.report_plot)
    if plot:
        log(f"curves: {plot}")
    return TrainResult("grpo", config.output_dir, final, total, time.perf_counter() - began, last)


def grpo_step(engine, reference, live, vocab, tokenizer, examples, schedule, step, config, device, pad_id) -> dict:
    tic = _clock(device)
    indices = schedule.step_examples(step)
    chunk_size = config.per_device_train_batch_size
    # rollout_s includes gather_s (ZeRO-3: gathering the policy's parameters and building the decoder on them)
    timings = {"rollout_s": 0.0, "gather_s": 0.0, "reference_s": 0.0, "policy_s": 0.0}
    chunks = []  # 1-3: rollouts, rewards and advantages of every chunk, before any update of this step
    for c in range(0, len(indices), chunk_size):
        t0 = _clock(device)
        rollouts = live.rollouts([examples[i] for i in indices[c:c + chunk_size]], vocab, step)
        timings["rollout_s"] += _clock(device) - t0
        timings["gather_s"] += live.gather_s
        chunks.append(make_chunk(rollouts, config))
    old_logps = {} if config.num_iterations > 1 else None
    for _ in range(config.num_iterations):  # 4: num_iterations optimizer steps on the same rollouts
        sums = accumulate_gradients(engine, reference, chunks, config, device, pad_id, timings, old_logps)
        t0 = _clock(device)
        lr = engine.lr()
        grad_norm = engine.step()
        timings["policy_s"] += _clock(device) - t0
    reduced = all_reduce_sum([sums["loss"], sums["kl"], sums["clip_frac"], sums["tokens"]], device)
    metrics = {}
    rollout_stats = [rollout_metrics(c.rollouts) for c in chunks]
    for key in rollout_stats[0]:
        values = [s[key] for s in rollout_stats]
        metrics[key] = sum(values) if key in ("generated_tokens", "rollout_seconds") else sum(values) / len(values)
    zero = torch.cat([c.zero_groups for c in chunks]).float()
    # with num_iterations = 1 the loss VALUE is ~0 (ratio 1, centred advantages) while its gradient is not:
    # grad_norm is the number that shows learning
    metrics.update({"loss": reduced[0], "kl": reduced[1] / max(reduced[3], 1), "clip_frac": reduced[2] / max(reduced[3], 1),
                    "grad_norm": grad_norm, "lr": lr, "zero_advantage_frac": float(zero.mean()),
                    "trained_rows": sums["rows"], **timings})
    metrics["step_s"] = _clock(device) - tic
    # every rank's numbers -> the step's: counts summed, wall times the slowest rank's, rates and fractions averaged
    metrics = reduce_over_ranks(metrics, device, sums=("generated_tokens", "rollout_tokens_per_second"),
                                maxima=("completion_length_max", "rollout_seconds", "rollout_s", "gather_s",
                                        "reference_s", "policy_s", "step_s"),
                                already_global=("loss", "kl", "clip_frac", "grad_norm", "lr", "trained_rows"))
    metrics["tokens_per_s"] = metrics["generated_tokens"] / max(metrics["step_s"], 1e-9)
    if config.log_completions_steps and (step + 1) % config.log_completions_steps == 0:
        first = chunks[0].rollouts
        metrics["_samples"] = decode_samples(first, tokenizer, min(4, first.num_samples))
    return metrics
