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


def load_config(path: str, *, trust_remote_code: bool = False):
    """The checkpoint's transformers config. Code from the checkpoint folder runs only with trust_remote_code=True
    (never a prompt); a config.json transformers cannot read is a ValueError naming the file."""
    from transformers import AutoConfig

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face checkpoint directory or a transformers model")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers' config classes raise anything (ZeroDivisionError for 0 heads, ...)
        raise ValueError(f"{config_path}: not a config transformers can read ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, or None when the folder has no tokenizer files; tokenizer files that do not load
    are a ValueError naming the folder (never a silent None)."""
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers/transformers raise KeyError, AttributeError, Exception... for a broken file
        raise ValueError(f"{path}: its tokenizer files cannot be loaded ({_first_line(e)})") from None


def shard_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: those the index file names when there is one, else path/*.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = _shards_from_index(path, index)
    else:
        shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
        raise FileNotFoundError(f"{path}: no *.safetensors files (pytorch_model.bin checkpoints are not supported)")
    for shard in shards:
        if not os.path.isfile(shard):
            if os.path.isfile(index):
                raise FileNotFoundError(f"{index} names a missing shard {shard}")
            raise FileNotFoundError(f"{shard} is not a file")
    return shards


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def weight_headers(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype such as "BF16") of every tensor in the checkpoint, from the headers only."""
    from safetensors import safe_open

    headers = {}
    for shard in shard_files(path):
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_slice(name)
                    headers[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
        except Exception as e:  # safetensors raises its own error types for a truncated or garbage file
            raise ValueError(f"{shard}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return headers


def weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the checkpoint, read from the safetensors headers (no weights loaded);
    a weight or bias that is not floating point is a ValueError naming it."""
    headers = weight_headers(path)
    not_float = sorted(name for name, (_, dtype) in headers.items()
                       if dtype not in FLOAT_DTYPES and name.endswith((".weight", ".bias")))
    if not_float:
        raise ValueError(f"{path}: weight {not_float[0]!r} has dtype {headers[not_float[0]][1]}; weights must be "
                         "floating point (quantized checkpoints are not supported)")
    return {name: shape for name, (shape, _) in headers.items()}


def _target_dtype(name: str, tensor: torch.Tensor, dtype, keep_float32) -> torch.dtype:
    """The model dtype for floating tensors, fp32 for those the model keeps in fp32 (keep_float32(name))."""
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if keep_float32 is not None and keep_float32(name) else dtype


def load_safetensors_dir(path: str, device, dtype, keep_float32=None) -> dict[str, torch.Tensor]:
    """Every tensor of path/*.safetensors (the index file, when present, lists the shards)."""
    from safetensors import safe_open

    weight_shapes(path)  # every header readable and every weight floating point, or an error naming the file
    weights: dict[str, torch.Tensor] = {}
    for shard in shard_files(path):
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    weights[name] = tensor.to(device=device, dtype=_target_dtype(name, tensor, dtype, keep_float32))
        except (OSError, RuntimeError) as e:  # headers fine, data unreadable
            raise ValueError(f"{shard}: its tensors cannot be read ({_first_line(e)})") from None
    return weights


def _shards_from_index(path: str, index: str) -> list[str]:
    """The shard files an index names; each must be a file name inside the checkpoint folder."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index (needs a \"weight_map\" object): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: \"weight_map\" must map weight names to shard file names")
    folder = os.path.realpath(path)
    shards = set()
    for name, shard in weight_map.items():
        full = os.path.realpath(os.path.join(folder, shard))
        if os.path.dirname(full) != folder:
            raise ValueError(f"{index}: weight {name!r} points to {shard!r}, outside the checkpoint folder {path}; "
                             "shards must be files in the checkpoint folder itself")
        shards.add(full)
    return sorted(shards)


def check_weights(model_cls, config, shapes: dict, source: str) -> None:
    """Every weight model_cls reads is present with the shape config.json implies; raises ValueError naming the
    weight and the source (checkpoint folder or live module). shapes: name -> shape (or tensor)."""
    try:
        if hasattr(model_cls, "normalize_weights"):  # e.g. per-expert tensors (or their shapes) in the model's layout
            shapes = model_cls.normalize_weights(config, dict(shapes))
        expected = model_cls.expected_weights(config)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    missing = [name for name, (_, required) in expected.items() if required and name not in shapes]
    if missing:
        hint = (" (config.json has tie_word_embeddings false, so the output layer is not the embeddings)"
                if "lm_head.weight" in missing else "")
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"{source}: the checkpoint lacks weight {missing[0]!r}{more}{hint}")
    for name, (shape, _) in expected.items():
        found = shapes.get(name)
        found = tuple(getattr(found, "shape", found) or ()) if name in shapes else None
        if found is not None and found != shape:
            raise ValueError(f"{source}: weight {name!r} has shape {list(found)}, config.json implies "
                             f"{list(shape)}")


def weights_from_module(module: torch.nn.Module, device, dtype, keep_float32=None) -> dict[str, torch.Tensor]:
    """The module's parameters by name, shared (not copied) when device and dtype match (keep_float32(name): a
    weight the model keeps in fp32)."""
    weights: dict[str, torch.Tensor] = {}
    converted = []
    for name, tensor in module.state_dict(keep_vars=False).items():
        tensor = tensor.detach()
        target = _target_dtype(name, tensor, dtype, keep_float32)
        if tensor.is_floating_point() and (tensor.dtype != target or tensor.device != torch.device(device)):
            converted.append(name)
            tensor = tensor.to(device=device, dtype=target)
        weights[name] = tensor
    if converted:
        warnings.warn(f"Decoder: {len(converted)} weights (e.g. {converted[0]}) were copied to {device}/{dtype}; "
                      "they will not follow later updates of the module", stacklevel=3)
    return weights


def max_context(config, source: str = "the model") -> int:
    """max_position_embeddings (4096 when the config has none); a value that is not an int >= 2 is a ValueError
    naming source (the checkpoint folder)."""
    value = getattr(config, "max_position_embeddings", None)
    if value is None:
        return 4096
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"{source}: config.json's max_position_embeddings must be an int >= 2, got {value!r}")
    return value


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
