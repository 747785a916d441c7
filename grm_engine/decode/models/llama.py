"""Llama family for decoding: Llama 2/3, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm per head).

Weights are the checkpoint's own tensors under their transformers names (model.layers.0.self_attn.q_proj.weight,
...), used in place: loaded from a live nn.Module they are views of its parameters, so the decoder always
runs the current policy. Numerics follow transformers (norms in fp32, rotary tables in fp32 cast to the dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import AttentionMetadata, attention_backend, decode_attention, default_scale, prefill_attention, store_kv
from .layers import RotaryEmbedding, rms_norm
from .linear import SKINNY_MAX_ROWS, skinny_linear as skinny_linear_op

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}
FUSED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def layer_windows(config) -> list[int | None]:
    """Sliding window per layer (None = full attention), as transformers decides it for each family."""
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and config.model_type != "mistral":
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise NotImplementedError(f"{config.model_type}: layer types {sorted(unknown)} are not supported")
        return [window if t == "sliding_attention" else None for t in layer_types]
    if config.model_type == "mistral" and window is not None:
        return [window] * num_layers
    return [None] * num_layers


class LlamaForCausalLM:
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def __init__(self, config, weights: dict[str, torch.Tensor], max_positions: int):
        self.config = config
        self.weights = weights
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu")
        if act not in ACTIVATIONS:
            raise NotImplementedError(f"{config.model_type}: activation {act!r} is not supported ({sorted(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.fused_act = FUSED_ACTIVATIONS.get(act)  # the Triton gated-activation kernel's name for it, if it has one
        self.fused = False  # Triton kernels for norms, rotary + store, gated activation (set per forward)
        self.windows = layer_windows(config)
        embed = self.w("model.embed_tokens.weight")
        self.device, self.dtype = embed.device, embed.dtype
        self.rotary = RotaryEmbedding(config, self.head_dim, max_positions, self.device, self.dtype)
        self.scale = default_scale(self.head_dim)
        self.softcap: float | None = None
        # Untied: the checkpoint's own head, never the embeddings in its place (check_weights names a missing one).
        self.lm_head = embed if getattr(config, "tie_word_embeddings", False) else self.w("lm_head.weight")

    @classmethod
    def expected_weights(cls, config) -> dict[str, tuple[tuple[int, ...], bool]]:
        """name -> (shape, required) of every weight this class reads, from the config's sizes."""
        hidden, vocab = config.hidden_size, config.vocab_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // max(heads, 1)
        inter = config.intermediate_size
        sizes = dict(hidden_size=hidden, vocab_size=vocab, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=head_dim, intermediate_size=inter, num_hidden_layers=config.num_hidden_layers)
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise ValueError(f"config: {', '.join(bad)}; every size must be a positive integer")
        if heads % kv_heads:
            raise ValueError(f"config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        expected = {"model.embed_tokens.weight": ((vocab, hidden), True), "model.norm.weight": ((hidden,), True)}
        if not getattr(config, "tie_word_embeddings", False):
            expected["lm_head.weight"] = ((vocab, hidden), True)
        rows = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}"
            for norm in cls.layer_norms:
                expected[f"{prefix}.{norm}.weight"] = ((hidden,), True)
            for name, out in rows.items():
                expected[f"{prefix}.self_attn.{name}.weight"] = ((out, hidden), True)
                expected[f"{prefix}.self_attn.{name}.bias"] = ((out,), False)
            expected[f"{prefix}.self_attn.o_proj.weight"] = ((hidden, heads * head_dim), True)
            expected[f"{prefix}.self_attn.o_proj.bias"] = ((hidden,), False)
            for name in ("gate_proj", "up_proj"):
                expected[f"{prefix}.mlp.{name}.weight"] = ((inter, hidden), True)
                expected[f"{prefix}.mlp.{name}.bias"] = ((inter,), False)
            expected[f"{prefix}.mlp.down_proj.weight"] = ((hidden, inter), True)
            expected[f"{prefix}.mlp.down_proj.bias"] = ((hidden,), False)
            qwen3 = config.model_type == "qwen3"  # q/k RMSNorm per head
            expected[f"{prefix}.self_attn.q_norm.weight"] = ((head_dim,), qwen3)
            expected[f"{prefix}.self_attn.k_norm.weight"] = ((head_dim,), qwen3)
        return expected

    layer_norms = ("input_layernorm", "post_attention_layernorm")

    # ---- merged projections: q/k/v and gate/up as one GEMM each (fewer launches, one weight stream) ----
    MERGED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}

    def merged_bytes(self) -> int:
        """Bytes a copy of every mergeable weight would take."""
        return sum(self.w(f"model.layers.{i}.{part}.weight").nbytes for i in range(self.num_layers)
                   for parts in self.MERGED.values() for part in parts)

    def merge_projections(self, owns_weights: bool) -> None:
        """Concatenate each layer's q/k/v (and gate/up) weights and biases into one tensor. owns_weights: the
        originals become views of the merged tensor (no extra memory); otherwise (live module weights) the merged
        tensors are copies, refreshed by refresh_merged() before each generate."""
        self.merged_from: dict[str, tuple[str, ...]] = {}
        for layer in range(self.num_layers):
            for merged, parts in self.MERGED.items():
                for kind in ("weight", "bias"):
                    names = [f"model.layers.{layer}.{part}.{kind}" for part in parts]
                    if not all(name in self.weights for name in names):
                        continue
                    key = f"model.layers.{layer}.{merged}.{kind}"
                    tensors = [self.weights[name] for name in names]
                    self.weights[key] = torch.cat(tensors)  # [sum of rows, hidden] (or [sum of rows])
                    if owns_weights:
                        for name, view in zip(names, self.weights[key].split([t.shape[0] for t in tensors])):
                            self.weights[name] = view
                    else:
                        self.merged_from[key] = tuple(names)

    def refresh_merged(self) -> None:
        """Copy the live weights into their merged copies (they may have changed since the last generate)."""
        for key, names in getattr(self, "merged_from", {}).items():
            torch.cat([self.weights[name] for name in names], out=self.weights[key])

    def projections(self, x: torch.Tensor, layer: int, merged: str) -> list[torch.Tensor]:
        """The outputs of the linears that MERGED[merged] names, in order: from one GEMM when they are merged
        (column views of its output), else one GEMM each."""
        prefix = f"model.layers.{layer}"
        parts = self.MERGED[merged]
        if f"{prefix}.{merged}.weight" not in self.weights:
            return [self.linear(x, f"{prefix}.{part}") for part in parts]
        sizes = [self.w(f"{prefix}.{part}.weight").shape[0] for part in parts]
        return list(self.linear(x, f"{prefix}.{merged}").split(sizes, dim=-1))

    def w(self, name: str) -> torch.Tensor:
        try:
            return self.weights[name]
        except KeyError:
            raise KeyError(f"{self.config.model_type}: checkpoint lacks weight {name!r}") from None

    gemma_norm = False  # (1 + w) RMSNorm weights (Gemma)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.fused and x.is_contiguous():
            from grm_engine.kernels.rms_norm import rms_norm_triton

            return rms_norm_triton(x.view(-1, x.shape[-1]), self.w(name), self.eps, gemma=self.gemma_norm).view(x.shape)
        return self.norm_reference(x, name)

    def norm_reference(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm(x, self.w(name), self.eps)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x + delta, norm(x + delta)): the residual add and the next norm, one kernel on the fused path."""
        if self.fused and x.is_contiguous() and delta.is_contiguous():
            from grm_engine.kernels.rms_norm import rms_norm_triton

            normed, x = rms_norm_triton(x, self.w(name), self.eps, delta=delta, gemma=self.gemma_norm)
            return x, normed
        x = x + delta
        return x, self.norm_reference(x, name)

    skinny_linear = False  # DecoderConfig.skinny_linear (the Decoder sets it)
    skinny = False  # this forward's projections run the split-K kernel (a decode step on the Triton path)

    def linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        weight, bias = self.w(prefix + ".weight"), self.weights.get(prefix + ".bias")
        if self.skinny and x.dim() == 2 and x.dtype == weight.dtype:
            return skinny_linear_op(x, weight, bias)
        return F.linear(x, weight, bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.w("model.embed_tokens.weight"))

    def attention(self, x, layer: int, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; stores this step's K/V into the layer's pages first."""
        prefix = f"model.layers.{layer}.self_attn"
        q, k, v = self.projections(x, layer, "self_attn.qkv_proj")
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D] (a column view of the merged output: any row stride)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if prefix + ".q_norm.weight" in self.weights:  # Qwen3: RMSNorm over each head before rope
            q = self.norm(q, prefix + ".q_norm.weight")
            k = self.norm(k, prefix + ".k_norm.weight")
        k_cache, v_cache = kv_cache
        if self.fused and self.head_dim & (self.head_dim - 1) == 0:  # one kernel: rotate q, k in place, store k, v
            from grm_engine.kernels.rotary_store import rotary_store_triton

            rotary_store_triton(q, k, v, *rope, k_cache, v_cache, meta.slot_mapping)
        else:
            q, k = self.rotary.rotate(q, *rope), self.rotary.rotate(k, *rope)
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        window = self.windows[layer]
        if meta.is_prefill:
            out = prefill_attention(q, k, v, k_cache, v_cache, meta, self.scale, window, self.softcap)
        else:
            out = decode_attention(q, k_cache, v_cache, meta, self.scale, window, self.softcap)
        return self.linear(out.reshape(x.shape[0], self.num_heads * self.head_dim), prefix + ".o_proj")

    def mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        prefix = f"model.layers.{layer}.mlp"
        gate, up = self.projections(x, layer, "mlp.gate_up_proj")
        if self.fused and self.fused_act is not None:
            from grm_engine.kernels.gated_act import gated_act_triton

            return self.linear(gated_act_triton(gate, up, self.fused_act), prefix + ".down_proj")
        return self.linear(self.act(gate) * up, prefix + ".down_proj")

    def decoder_layer(self, x, layer, rope, kv_cache, meta):
        prefix = f"model.layers.{layer}"
        attn = self.attention(self.norm(x, prefix + ".input_layernorm.weight"), layer, rope, kv_cache, meta)
        x, normed = self.add_norm(x, attn, prefix + ".post_attention_layernorm.weight")
        return x + self.mlp(normed, layer)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        self.fused = attention_backend(self.device) == "triton"
        self.skinny = (self.skinny_linear and self.fused and not meta.is_prefill
                       and input_ids.shape[0] <= SKINNY_MAX_ROWS)
        x = self.embed(input_ids)
        rope = self.rotary.tables(positions)
        for layer in range(self.num_layers):
            x = self.decoder_layer(x, layer, rope, kv_caches[layer], meta)
        return self.norm(x, "model.norm.weight")

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab] (the product in the model dtype, as transformers)."""
        return F.linear(hidden, self.lm_head).float()
