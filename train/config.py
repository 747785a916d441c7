"""One config system for every training stage: dataclasses with METHOD.md defaults, a YAML file, `--key value`
overrides, the resolved config saved next to the checkpoints.

Names follow TRL where the concept is the same (learning_rate, per_device_train_batch_size,
gradient_accumulation_steps, num_generations, beta, max_completion_length, logging_steps, save_steps, seed).
Every error is a ConfigError naming the key (and the file), raised before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, fields

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key, the file and the fix."""


def jsonl_objects(path: str, expected: str = "a JSON object"):
    """(line number, where, object) for every non-blank line of a jsonl file; a line that is not a JSON object, or a file that
    cannot be read as UTF-8, is a ConfigError naming the file and line."""
    try:
        handle = open(path, encoding="utf-8-sig")  # a byte-order mark before line 1 is not an error
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    with handle:
        number = 0
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as e:  # RecursionError: brackets nested too deep
                    raise ConfigError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
                if not isinstance(obj, dict):
                    raise ConfigError(f"{where}: {expected} is expected")
                yield number, where, obj
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}, line {number + 1}: not UTF-8 ({e.reason})") from None


@dataclass
class TrainConfig:
    """Settings every stage shares."""
    model: str = ""  # Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer) to start from
    data: str = ""  # training data (jsonl); what the rows hold depends on the stage
    output_dir: str = ""  # checkpoints, metrics.jsonl, config.yaml and the final model (output_dir/final)
    seed: int = 0
    learning_rate: float = 5e-6  # METHOD.md: RFT of the 27B
    lr_scheduler_type: str = "constant_with_warmup"  # constant | constant_with_warmup | linear | cosine
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 8  # sequences per micro-batch (see max_tokens_per_batch)
    gradient_accumulation_steps: int = 1
    max_steps: int = 0  # optimizer steps; 0: num_train_epochs over the data
    num_train_epochs: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500  # 0: only the final checkpoint
    save_total_limit: int = 2  # complete checkpoints kept (the newest)
    deepspeed: str = ""  # "" = plain PyTorch; a preset (zero2, zero3, zero3_offload) or a DeepSpeed JSON file
    device: str = ""  # cpu, cuda, cuda:1; "" = cuda when available (under a launcher: the local rank's GPU)
    dtype: str = ""  # float32 | bfloat16; "" = bfloat16 under DeepSpeed on GPU, else float32 (plain GPU: bf16 autocast)
    max_seq_length: int = 2048  # prompt + completion tokens; longer rows are an error naming the row
    max_tokens_per_batch: int = 0  # > 0: micro-batches packed up to this many tokens instead of a fixed count
    gradient_checkpointing: bool = False
    resume: bool = True  # rerunning on the same output_dir continues from its newest complete checkpoint
    trust_remote_code: bool = False
    report_plot: bool = True  # write metrics.png at the end


@dataclass
class SFTConfig(TrainConfig):
    """grm-engine train sft: data = jsonl of {"prompt", "completion"} (loss on completion tokens only)."""
    general_data: str = ""  # optional general instruction jsonl (prompt/completion), mixed in
    general_ratio: float = 0.0  # fraction of each epoch's rows drawn from general_data
    packing: bool = True  # several rows per sequence, attention kept within each row


@dataclass
class RFTConfig(SFTConfig):
    """grm-engine train rft: data = preference examples; sample, reject, then SFT on what is kept.

    The RFT sampling temperature is not in the paper. 1.0 by default: rejective sampling needs diverse
    trajectories (a cold sampler repeats the greedy critique N times, so examples are dropped as too easy or
    give N copies of one trajectory); the eval temperature 0.5 is kept for voting.
    """
    num_generations: int = 3  # N_RFT unhinted samples per example
    hinted: bool = True  # one extra sample with the hint naming the best response, kept only if correct
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 1024
    template: str = "default"
    shuffle: bool = True
    rollout_batch_examples: int = 256  # examples per decoder run
    kv_cache_memory_fraction: float = 0.5
    trajectories: str = ""  # "" = output_dir/rft_trajectories.jsonl; an existing file of ours is reused


@dataclass
class MetaRMConfig(TrainConfig):
    """grm-engine train meta-rm: data = `grm-engine score` output or RFT trajectories (labels by Eq. 10)."""
    learning_rate: float = 1e-5  # METHOD.md
    examples: str = ""  # the examples jsonl the score output refers to (query, responses); needed for score output
    eval_fraction: float = 0.1  # held-out split (by example id) for loss / accuracy / AUC
    max_seq_length: int = 4096
    template: str = "default"


@dataclass
class GRPOConfig(TrainConfig):
    """grm-engine train grpo: data = preference examples; online GRPO with the +1/-1 rule reward (METHOD.md)."""
    learning_rate: float = 4e-7  # METHOD.md
    num_generations: int = 4  # G, the group size
    per_device_train_batch_size: int = 8  # prompts per step and device (x num_generations rollouts)
    beta: float = 0.08  # KL coefficient (27B)
    epsilon: float = 0.2  # clip epsilon low
    epsilon_high: float = 0.2
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo
    scale_rewards: str = "group"  # group | batch | none
    num_iterations: int = 1  # policy updates per rollout batch (> 1 uses old log-probs)
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 1024
    ignore_eos: bool = False  # benchmarks: every rollout runs to max_completion_length
    template: str = "default"
    shuffle: bool = True  # a fresh response order per sample and step (the paper's protocol)
    # drop groups whose G rewards are all equal before the policy forward: their advantage is 0, so with beta = 0
    # they add no gradient; with beta > 0 skipping also drops their KL term (a different objective), hence opt-in
    skip_zero_advantage: bool = False
    max_tokens_per_micro_batch: int = 16384  # policy / reference forward micro-batches by token budget
    kv_cache_memory_fraction: float = 0.3
    log_completions_steps: int = 10
    # copy: a frozen second model on every GPU; sharded (ZeRO-3 only): the frozen model partitioned across the GPUs
    # as the policy is (its forward gathers each layer: memory / world size, slower reference pass); none: beta = 0
    reference: str = "copy"
    drop_easy: str = ""  # a `grm-engine score` output: drop examples every sample of it answered correctly


STAGES = {"sft": SFTConfig, "rft": RFTConfig, "meta-rm": MetaRMConfig, "grpo": GRPOConfig}
CHOICES = {
    "lr_scheduler_type": ("constant", "constant_with_warmup", "linear", "cosine"),
    "dtype": ("", "float32", "bfloat16"),
    "loss_type": ("grpo", "bnpo", "dr_grpo"),
    "scale_rewards": ("group", "batch", "none"),
    "reference": ("copy", "sharded", "none"),
}
# keys that may change between a run and its resume (everything else must match the saved config)
RESUME_MAY_CHANGE = {"resume", "max_steps", "num_train_epochs", "logging_steps", "save_steps", "save_total_limit",
                     "report_plot", "log_completions_steps", "device"}


def _coerce(name: str, annotation, value, where: str):
    """value (from YAML or a flag string) -> the field's type, or ConfigError."""
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(annotation if isinstance(annotation, str)
                                                                    else getattr(annotation, "__name__", ""))
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
        elif kind is int:
            try:
                value = int(text)
            except ValueError:
                pass
        elif kind is float:
            try:
                value = float(text)
            except ValueError:
                pass
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {name} = {value!r} must be finite")
        return float(value)
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: {name} = {value!r} must be {kind.__name__ if kind else annotation}")


def _validate(config: TrainConfig, where: str) -> None:
    def need(ok, message):
        if not ok:
            raise ConfigError(f"{where}: {message}")

    for key, allowed in CHOICES.items():
        if hasattr(config, key):
            need(getattr(config, key) in allowed, f"{key} = {getattr(config, key)!r} is not one of {allowed}")
    if hasattr(config, "template"):  # 'default', 'single', a template file or single:FILE (grm_engine/templates.py)
        from grm_engine.templates import TemplateError, resolve_template

        try:
            resolve_template(config.template)
        except TemplateError as e:
            raise ConfigError(f"{where}: template: {e}") from None
    need(config.model, "model is required (a Hugging Face checkpoint directory)")
    need(config.data, "data is required (a jsonl file)")
    need(config.output_dir, "output_dir is required")
    need(config.learning_rate > 0, f"learning_rate = {config.learning_rate} must be > 0")
    need(0 <= config.warmup_ratio < 1, f"warmup_ratio = {config.warmup_ratio} must be in [0, 1)")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "max_seq_length",
                "save_total_limit"):
        need(getattr(config, key) >= 1, f"{key} = {getattr(config, key)} must be >= 1")
    for key in ("max_steps", "save_steps", "max_tokens_per_batch"):
        need(getattr(config, key) >= 0, f"{key} = {getattr(config, key)} must be >= 0")
    need(config.max_steps > 0 or config.num_train_epochs > 0, "give max_steps > 0 or num_train_epochs > 0")
    need(config.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 disables clipping)")
    need(config.weight_decay >= 0, f"weight_decay = {config.weight_decay} must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(config, key) < 1, f"{key} = {getattr(config, key)} must be in [0, 1)")
    for key in ("epsilon", "epsilon_high"):
        if hasattr(config, key):
            need(getattr(config, key) >= 0, f"{key} = {getattr(config, key)} must be >= 0")
    if hasattr(config, "kv_cache_memory_fraction"):
        need(0 < config.kv_cache_memory_fraction <= 1,
             f"kv_cache_memory_fraction = {config.kv_cache_memory_fraction} must be in (0, 1]")
    if config.device:
        from grm_engine.preflight import PreflightError, check_device

        try:
            check_device(config.device)
        except PreflightError as e:
            raise ConfigError(f"{where}: device = {config.device!r}: {str(e).split(': ', 1)[-1]}") from None
    for key in ("num_generations", "max_completion_length", "num_iterations", "rollout_batch_examples",
                "max_tokens_per_micro_batch"):
        if hasattr(config, key):
            need(getattr(config, key) >= 1, f"{key} = {getattr(config, key)} must be >= 1")
    if hasattr(config, "temperature"):
        need(config.temperature >= 0, f"temperature = {config.temperature} must be >= 0")
        need(0 < config.top_p <= 1, f"top_p = {config.top_p} must be in (0, 1]")
    if isinstance(config, GRPOConfig):
        need(config.beta >= 0, f"beta = {config.beta} must be >= 0")
        need(config.num_generations >= 2 or config.scale_rewards != "group",
             "num_generations = 1 with scale_rewards = group: a one-sample group has no std")
        need(config.reference != "none" or config.beta == 0, "reference = none needs beta = 0")
        need(config.temperature > 0, "GRPO needs temperature > 0 (sampled rollouts)")
    if isinstance(config, SFTConfig):
        need(0 <= config.general_ratio < 1, f"general_ratio = {config.general_ratio} must be in [0, 1)")
        need(not config.general_ratio or config.general_data, "general_ratio > 0 needs general_data")
    if isinstance(config, MetaRMConfig):
        need(0 < config.eval_fraction < 1, f"eval_fraction = {config.eval_fraction} must be in (0, 1)")
    for key in ("data", "general_data", "examples", "drop_easy"):
        path = getattr(config, key, "")
        if path and not os.path.exists(path):
            raise ConfigError(f"{where}: {key} = {path!r} does not exist")
    if config.model and not os.path.isdir(config.model):
        raise ConfigError(f"{where}: model = {config.model!r} is not a directory (give a Hugging Face checkpoint "
                          "directory: config.json, *.safetensors, tokenizer)")
    stage = None
    if config.deepspeed:
        from .engine import resolve_deepspeed_config

        try:
            stage = resolve_deepspeed_config(config.deepspeed).get("zero_optimization", {}).get("stage", 0)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{where}: deepspeed = {config.deepspeed!r}: {e}") from None
    if getattr(config, "reference", "") == "sharded":
        need(stage == 3, f"reference = sharded partitions the reference as ZeRO-3 does the policy: it needs a "
                         f"deepspeed config with zero_optimization.stage 3 (deepspeed = {config.deepspeed!r})")


def _split_flags(argv: list[str]) -> list[tuple[str, str]]:
    """['--key', 'value', '--flag', '--k=v'] -> [(key, value)]; a bare flag means true."""
    pairs, i = [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"command line: unexpected argument {token!r} (give --key value pairs)")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        else:
            value, i = "true", i + 1
        pairs.append((key.replace("-", "_"), value))
    return pairs


def load_config(stage: str, config_file: str | None = None, overrides=None) -> TrainConfig:
    """The stage's dataclass from defaults <- YAML file <- overrides (a dict, or a list of `--key value` flags)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}: give one of {', '.join(STAGES)}")
    cls = STAGES[stage]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    values: dict = {}
    sources: dict = {}
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {config_file!r} does not exist")
        try:
            with open(config_file, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {config_file}: not valid YAML ({e})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file}: must be a mapping of key: value, got {type(loaded).__name__}")
        loaded.pop("stage", None)  # a saved config names its stage
        for key, value in loaded.items():
            values[str(key)], sources[str(key)] = value, f"config file {config_file}"
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
        flag_source = "overrides"
    else:
        pairs = _split_flags(list(overrides or []))
        flag_source = "command line"
    for key, value in pairs:
        values[key], sources[key] = value, f"{flag_source} --{key}" if flag_source == "command line" else flag_source
    unknown = sorted(set(values) - known)
    if unknown:
        where = sources[unknown[0]]
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for stage "
                          f"{stage} (known: {', '.join(sorted(known))})")
    resolved = {}
    for key, value in values.items():
        resolved[key] = _coerce(key, hints[key], value, sources[key])
    config = cls(**resolved)
    _validate(config, config_file or flag_source)
    return config


def config_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, stage: str, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump({"stage": stage, **config_dict(config)}, f, sort_keys=False)
    os.replace(tmp, path)


def check_resume_config(config: TrainConfig, stage: str, path: str) -> None:
    """A resumed run must be the same run: every key outside RESUME_MAY_CHANGE equals the saved one."""
    with open(path, encoding="utf-8") as f:
        saved = yaml.safe_load(f) or {}
    if saved.get("stage") != stage:
        raise ConfigError(f"{path}: output_dir holds a {saved.get('stage')!r} run, not {stage!r}; "
                          "choose another output_dir")
    current = config_dict(config)
    differ = [k for k in current if k not in RESUME_MAY_CHANGE and saved.get(k) != current[k]]
    if differ:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current[k]!r}" for k in differ[:5])
        raise ConfigError(f"{path}: output_dir holds a different run ({detail}); resume it with the same settings, "
                          "or choose another output_dir")
