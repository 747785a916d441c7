"""The run's output directory and model loading: what every stage does before its first step.

output_dir is ours or new: a directory with files but no config.yaml of ours is refused (never written into);
one with our config.yaml is resumed when the settings match (config.check_resume_config) and refused otherwise.
Models load from safetensors only; remote code never runs unless trust_remote_code is set.
"""
from __future__ import annotations

import json
import os

import torch

from .checkpoint import check_resume_world_size, latest_checkpoint
from .config import ConfigError, check_resume_config, save_config
from .engine import barrier, init_distributed, is_main, world_size

CONFIG_FILE = "config.yaml"


def check_model_dir(path: str, what: str = "model", *, trust_remote_code: bool = False) -> None:
    """Fail before loading on a directory that is not a usable safetensors checkpoint (ConfigError naming it): the
    config transformers reads, readable safetensors headers with floating-point weights inside the folder, for a
    causal LM the decoder runs every weight with its shape (transformers would silently random-init a missing one),
    a valid context length and a tokenizer that loads. Reads headers, config and tokenizer only."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{what} = {path!r}: no config.json (give a Hugging Face checkpoint directory)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{config_path}: a JSON object with a model_type is expected")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise ConfigError(f"{what} = {path!r}: no *.safetensors weights (weights load from safetensors only)")
    if not {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} & set(os.listdir(path)):
        raise ConfigError(f"{what} = {path!r}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    from grm_engine.decode import loader
    from grm_engine.decode.models import MODEL_CLASSES, model_class

    try:
        model_config = loader.load_config(path, trust_remote_code=trust_remote_code)
        shapes = loader.weight_shapes(path)
        architectures = config.get("architectures") or []
        if config["model_type"] in MODEL_CLASSES and any(str(a).endswith("ForCausalLM") for a in architectures):
            loader.check_weights(model_class(model_config), model_config, shapes, f"{what} {path}")
        loader.max_context(model_config, f"{what} {path}")
        loader.load_tokenizer(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, NotImplementedError) as e:
        raise ConfigError(f"{what} = {path!r}: {e}") from None


def prepare_output_dir(config, stage: str) -> str | None:
    """Create or validate output_dir; -> the checkpoint to resume from (None: a fresh run). Under a launcher every
    rank reads output_dir before rank 0 writes in it (the process group is joined here for that barrier): a rank
    reading it while rank 0 created it saw a folder without config.yaml and refused to start (seen in CI)."""
    out = config.output_dir
    if world_size() > 1:
        try:
            init_distributed(config)
        except ValueError as e:  # several processes without DeepSpeed
            raise ConfigError(str(e)) from None
    saved = os.path.join(out, CONFIG_FILE)
    resume_from = None
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(saved):
            raise ConfigError(f"output_dir = {out!r} exists and is not a grm-engine training run (no {CONFIG_FILE}); "
                              "nothing in it was touched: choose a new or empty directory")
        check_resume_config(config, stage, saved)
        resume_from = latest_checkpoint(out)
        if resume_from is not None:
            check_resume_world_size(config, resume_from)
        if resume_from is not None and not config.resume:
            raise ConfigError(f"output_dir = {out!r} has checkpoints ({os.path.basename(resume_from)}) and resume is "
                              "false; choose another output_dir, or drop --resume false to continue")
        if os.path.isdir(os.path.join(out, "final")) and resume_from is not None:
            from .checkpoint import read_trainer_state

            state = read_trainer_state(resume_from)
            if state.get("finished") and config.max_steps <= int(state["step"]):
                raise ConfigError(f"output_dir = {out!r} holds a finished run of {state['step']} steps (final model in "
                                  f"{out}/final); choose another output_dir, or raise max_steps to train further "
                                  "(the LR schedule then spans the new max_steps)")
    elif os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir = {out!r} is a file, not a directory")
    barrier()  # every rank has checked output_dir as it was before this run
    if is_main():
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output_dir = {out!r}: cannot create it ({e.strerror})") from None
        if not os.access(out, os.W_OK):
            raise ConfigError(f"output_dir = {out!r} is not writable")
        save_config(config, stage, saved)
    barrier()
    return resume_from


def load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model = {path!r}: the tokenizer has no EOS token; the trainer ends every completion "
                          "with it (set eos_token in tokenizer_config.json)")
    return tokenizer


def from_pretrained_sdpa_or_eager(model_class, path: str, **kwargs):
    """model_class.from_pretrained with PyTorch's SDPA attention, or transformers' eager attention for an
    architecture without SDPA support (Gemma 2: its attention soft-capping; the training batches then pass
    additive masks, see batches.model_attention_mask)."""
    try:
        return model_class.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    except ValueError as e:
        if "does not support an attention implementation" not in str(e):
            raise
        return model_class.from_pretrained(path, attn_implementation="eager", **kwargs)


def load_causal_lm(path: str, config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return from_pretrained_sdpa_or_eager(AutoModelForCausalLM, path, dtype=dtype, use_safetensors=True,
                                         trust_remote_code=config.trust_remote_code)


def load_dtype(config, device) -> torch.dtype:
    """The dtype module weights are loaded in: bf16 under DeepSpeed on a GPU, else fp32 (plain GPU: autocast)."""
    from .engine import resolve_dtype

    dtype = resolve_dtype(config, device)
    return dtype if config.deepspeed else torch.float32
