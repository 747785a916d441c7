"""Pieces shared by the model families: RMSNorm, rotary embeddings (with the config's rope scaling)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama style: normalize in fp32, cast back, then scale (transformers' LlamaRMSNorm numerics;
    F.rms_norm is the same fp32 math in fewer kernels)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma style: scale by (1 + weight) in fp32, then cast back."""
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * (1.0 + weight.float())).to(x.dtype)


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope settings in config.rope_parameters; older configs in rope_theta/rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if params:
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            raise NotImplementedError(f"{config.model_type}: per-layer-type rope_parameters are not supported")
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class RotaryEmbedding:
    """cos/sin tables [max_positions, head_dim] computed in fp32 as transformers does, cast to the model dtype."""

    def __init__(self, config, head_dim: int, max_positions: int, device, dtype):
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
            raise NotImplementedError(f"{config.model_type}: partial_rotary_factor is not supported")
        if rope_type == "default":
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            attention_scaling = 1.0
        elif rope_type in ("linear", "llama3", "yarn"):
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        else:
            raise NotImplementedError(
                f"{config.model_type}: rope_type {rope_type!r} is not supported (default, linear, llama3, yarn are); "
                "dynamic and longrope change with the sequence length")
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq.float()[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = (emb.cos() * attention_scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * attention_scaling).to(device=device, dtype=dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, D], looked up once per forward and reused by every layer."""
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] -> x rotated (rotate-half convention)."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
