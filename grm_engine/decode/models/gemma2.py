"""Gemma 2 for decoding: embeddings scaled by sqrt(hidden), (1 + w) RMSNorms before and after attention and
MLP, GeLU-tanh MLP, alternating sliding-window layers, attention and final logit soft-capping,
attention scale query_pre_attn_scalar ** -0.5. Same weight naming and numerics rules as llama.py."""
from __future__ import annotations

import torch

from .layers import gemma_rms_norm
from .llama import LlamaForCausalLM


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_types = ("gemma2",)

    def __init__(self, config, weights: dict[str, torch.Tensor], max_positions: int):
        super().__init__(config, weights, max_positions)
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.lm_head = self.w("model.embed_tokens.weight")  # Gemma 2 always ties the head

    gemma_norm = True
    layer_norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")

    @classmethod
    def expected_weights(cls, config):
        expected = super().expected_weights(config)
        expected.pop("lm_head.weight", None)  # always tied
        return expected

    def norm_reference(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return gemma_rms_norm(x, self.w(name), self.eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids)
        # transformers rounds the normalizer to the model dtype before multiplying
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)

    def decoder_layer(self, x, layer, rope, kv_cache, meta):
        prefix = f"model.layers.{layer}"
        attn = self.attention(self.norm(x, prefix + ".input_layernorm.weight"), layer, rope, kv_cache, meta)
        x = x + self.norm(attn, prefix + ".post_attention_layernorm.weight")
        mlp = self.mlp(self.norm(x, prefix + ".pre_feedforward_layernorm.weight"), layer)
        return x + self.norm(mlp, prefix + ".post_feedforward_layernorm.weight")

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_softcap is not None:
            # transformers caps in the model dtype before generate casts to fp32
            logits = logits.to(hidden.dtype)
            logits = (torch.tanh(logits / self.final_softcap) * self.final_softcap).float()
        return logits
