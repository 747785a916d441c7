"""Weights and config for the decoder: from a safetensors directory (sharded or not) or a live transformers model.

From a live model the weights are its parameters' own storage (no copy) when dtype and device already match,
so a training loop that updates them in place is decoded with the current values.
"""
from __future__ import annotations

import glob
import json
import os
import warnings

import torch


def load_config(path: str):
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face checkpoint directory or a transformers model")
    return AutoConfig.from_pretrained(path)


def load_safetensors_dir(path: str, device, dtype) -> dict[str, torch.Tensor]:
    """Every tensor of path/*.safetensors (the index file, when present, lists the shards)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
    else:
        shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
        raise FileNotFoundError(f"{path}: no *.safetensors files (pytorch_model.bin checkpoints are not supported)")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"{index} names a missing shard {shard}")
        with safe_open(shard, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                weights[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    return weights


def weights_from_module(module: torch.nn.Module, device, dtype) -> dict[str, torch.Tensor]:
    """The module's parameters by name, shared (not copied) when device and dtype match."""
    weights: dict[str, torch.Tensor] = {}
    converted = []
    for name, tensor in module.state_dict(keep_vars=False).items():
        tensor = tensor.detach()
        if tensor.is_floating_point() and (tensor.dtype != dtype or tensor.device != torch.device(device)):
            converted.append(name)
            tensor = tensor.to(device=device, dtype=dtype)
        weights[name] = tensor
    if converted:
        warnings.warn(f"Decoder: {len(converted)} weights (e.g. {converted[0]}) were copied to {device}/{dtype}; "
                      "they will not follow later updates of the module", stacklevel=3)
    return weights


def max_context(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or 4096)


def generation_eos_ids(path_or_module, config) -> list[int]:
    """EOS ids from the generation config (what transformers generate stops on), else the model config."""
    eos = None
    gen = getattr(path_or_module, "generation_config", None)
    if gen is None and isinstance(path_or_module, str):
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(path_or_module)
        except (OSError, ValueError):
            gen = None
    if gen is not None:
        eos = gen.eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
