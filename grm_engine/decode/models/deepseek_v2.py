"""DeepSeek-V2 (and V2-Lite) for decoding: multi-head latent attention over a paged latent cache (models/mla.py) and
a mixture of experts after the first first_k_dense_replace dense layers (models/moe.py).

Weights keep their transformers names and are used in place (views of a live module's parameters). Routed experts
are [E, 2I, H] gate/up and [E, H, I] down tensors as transformers 5 holds them; a checkpoint with one tensor per
expert (mlp.experts.N.gate_proj.weight, as released) is stacked into that layout at load. The router weight stays
fp32 (transformers keeps it so). Numerics follow transformers (norms and rotary in fp32, the router in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import AttentionMetadata
from .llama import ACTIVATIONS, FUSED_ACTIVATIONS, LlamaForCausalLM
from .mla import InterleavedRotary, mla_decode, mla_prefill, store_latent, yarn_softmax_scale
from .moe import Router, routed_experts


def _positive_int(config, name: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config: {name}={value!r} must be a positive integer")
    return value


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    model_types = ("deepseek_v2",)
    # The shared-prefix path reads a prompt's latent pages once per tile of block_m (sample, head) rows (models/mla.py,
    # kernels/mla_attention.py). block_m 64: a [64, kv_lora_rank 512] fp32 accumulator spills ~0.7 KB on sm_90 but
    # halves the prefix re-reads and measured 0.180 ms vs 0.304 ms at 32 rows (H200, 256 sequences in groups of 32
    # sharing 2,048 tokens, bench/gpu_deepseek_v2.py, session 5). split_tokens 1024: a prefix split costs an fp32 partial of H x R per sequence (32 KiB at
    # V2-Lite's 16 x 512, written and read back), so fewer, longer splits than the K/V kernel's default.
    supports_cascade = True
    cascade_plan_options = dict(block_m=64, split_tokens=1024)
    layer_norms = ("input_layernorm", "post_attention_layernorm")
    MERGED = {"self_attn.q_kv_a_proj": ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
              "self_attn.qa_kv_a_proj": ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
              "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
              "mlp.shared_experts.gate_up_proj": ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")}

    def __init__(self, config, weights: dict[str, torch.Tensor], max_positions: int):
        self.config, self.weights = config, weights
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.latent_dim = config.kv_lora_rank
        self.rope_dim = config.qk_rope_head_dim
        self.nope_dim = config.qk_nope_head_dim
        self.v_dim = config.v_head_dim
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        # the cache: one row of latent + rope key per token and layer, shared by all heads (as one KV head)
        self.num_kv_heads, self.head_dim = 1, self.latent_dim + self.rope_dim
        self.kv_layout = (1, 1, self.head_dim)
        self.eps = config.rms_norm_eps
        act = getattr(config, "hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise NotImplementedError(f"{config.model_type}: activation {act!r} is not supported ({sorted(ACTIVATIONS)})")
        self.act, self.fused_act = ACTIVATIONS[act], FUSED_ACTIVATIONS.get(act)
        self.fused = False
        self.windows, self.softcap = [None] * self.num_layers, None
        self.first_dense = getattr(config, "first_k_dense_replace", 0) or 0
        self.router = Router(config) if self.first_dense < self.num_layers else None
        embed = self.w("model.embed_tokens.weight")
        self.device, self.dtype = embed.device, embed.dtype
        self.rotary = InterleavedRotary(config, self.rope_dim, max_positions, self.device)
        self.scale = yarn_softmax_scale(config, self.nope_dim + self.rope_dim)
        self.lm_head = embed if getattr(config, "tie_word_embeddings", False) else self.w("lm_head.weight")

    # ---- weights ----
    @staticmethod
    def keeps_float32(name: str) -> bool:
        """Weights loaded in fp32 whatever the model dtype: the router (transformers keeps it in fp32)."""
        return name.endswith(".mlp.gate.weight")

    @classmethod
    def is_moe_layer(cls, config, layer: int) -> bool:
        return layer >= (getattr(config, "first_k_dense_replace", 0) or 0)

    @classmethod
    def normalize_weights(cls, config, weights: dict) -> dict:
        """Stack per-expert tensors (mlp.experts.N.{gate,up,down}_proj.weight) into [E, 2I, H] gate_up and
        [E, H, I] down, in place of the per-expert entries. `weights` maps names to tensors or, for a check from
        the safetensors headers alone, to shapes. Other layouts pass through unchanged."""
        num_experts = getattr(config, "n_routed_experts", None) or 0
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp.experts"
            if f"{prefix}.gate_up_proj" in weights or f"{prefix}.0.gate_proj.weight" not in weights:
                continue
            names = [f"{prefix}.{e}.{part}.weight" for e in range(num_experts) for part in ("gate_proj", "up_proj", "down_proj")]
            missing = [n for n in names if n not in weights]
            if missing:
                raise ValueError(f"the checkpoint lacks weight {missing[0]!r} (n_routed_experts={num_experts})")
            gate_up = [(weights[f"{prefix}.{e}.gate_proj.weight"], weights[f"{prefix}.{e}.up_proj.weight"])
                       for e in range(num_experts)]
            down = [weights[f"{prefix}.{e}.down_proj.weight"] for e in range(num_experts)]
            if torch.is_tensor(down[0]):
                try:
                    weights[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in gate_up])
                    weights[f"{prefix}.down_proj"] = torch.stack(down)
                except RuntimeError as e:
                    raise ValueError(f"{prefix}: per-expert weights of different shapes ({e})") from None
            else:  # shapes: stacking needs equal shapes, as torch.stack would
                shapes = {tuple(g) for g, _ in gate_up} | {tuple(u) for _, u in gate_up}
                if len(shapes) != 1 or len({tuple(d) for d in down}) != 1:
                    raise ValueError(f"{prefix}: per-expert weights of different shapes")
                (rows, cols), = shapes
                weights[f"{prefix}.gate_up_proj"] = (num_experts, 2 * rows, cols)
                weights[f"{prefix}.down_proj"] = (num_experts, *tuple(down[0]))
            for name in names:
                del weights[name]
        return weights

    @classmethod
    def expected_weights(cls, config) -> dict[str, tuple[tuple[int, ...], bool]]:
        names = ("hidden_size", "vocab_size", "num_attention_heads", "num_hidden_layers", "kv_lora_rank",
                 "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "intermediate_size")
        hidden, vocab, heads, layers, latent, rope, nope, v_dim, inter = (_positive_int(config, n) for n in names)
        if rope % 2:
            raise ValueError(f"config: qk_rope_head_dim={rope} must be even (rotary pairs)")
        if getattr(config, "moe_layer_freq", 1) not in (None, 1):
            raise NotImplementedError(f"{config.model_type}: moe_layer_freq={config.moe_layer_freq} is not supported (1 is)")
        q_rank = getattr(config, "q_lora_rank", None)
        expected = {"model.embed_tokens.weight": ((vocab, hidden), True), "model.norm.weight": ((hidden,), True)}
        if not getattr(config, "tie_word_embeddings", False):
            expected["lm_head.weight"] = ((vocab, hidden), True)

        def linear(name, out, inp, bias_allowed=True):
            expected[name + ".weight"] = ((out, inp), True)
            if bias_allowed:
                expected[name + ".bias"] = ((out,), False)

        for layer in range(layers):
            p = f"model.layers.{layer}"
            for norm in cls.layer_norms:
                expected[f"{p}.{norm}.weight"] = ((hidden,), True)
            if q_rank is None:
                linear(f"{p}.self_attn.q_proj", heads * (nope + rope), hidden)
            else:
                linear(f"{p}.self_attn.q_a_proj", _positive_int(config, "q_lora_rank"), hidden)
                expected[f"{p}.self_attn.q_a_layernorm.weight"] = ((q_rank,), True)
                linear(f"{p}.self_attn.q_b_proj", heads * (nope + rope), q_rank, bias_allowed=False)
            linear(f"{p}.self_attn.kv_a_proj_with_mqa", latent + rope, hidden)
            expected[f"{p}.self_attn.kv_a_layernorm.weight"] = ((latent,), True)
            linear(f"{p}.self_attn.kv_b_proj", heads * (nope + v_dim), latent, bias_allowed=False)
            linear(f"{p}.self_attn.o_proj", hidden, heads * v_dim)
            if not cls.is_moe_layer(config, layer):
                for name in ("gate_proj", "up_proj"):
                    linear(f"{p}.mlp.{name}", inter, hidden)
                linear(f"{p}.mlp.down_proj", hidden, inter)
                continue
            experts, moe_inter = _positive_int(config, "n_routed_experts"), _positive_int(config, "moe_intermediate_size")
            expected[f"{p}.mlp.gate.weight"] = ((experts, hidden), True)
            expected[f"{p}.mlp.experts.gate_up_proj"] = ((experts, 2 * moe_inter, hidden), True)
            expected[f"{p}.mlp.experts.down_proj"] = ((experts, hidden, moe_inter), True)
            shared = (getattr(config, "n_shared_experts", 0) or 0) * moe_inter
            if shared:
                for name in ("gate_proj", "up_proj"):
                    linear(f"{p}.mlp.shared_experts.{name}", shared, hidden)
                linear(f"{p}.mlp.shared_experts.down_proj", hidden, shared)
        return expected

    def merged_bytes(self) -> int:
        return sum(self.weights[f"model.layers.{i}.{part}.weight"].nbytes for i in range(self.num_layers)
                   for parts in self.MERGED.values()
                   if all(f"model.layers.{i}.{part}.weight" in self.weights for part in parts) for part in parts)

    # ---- attention ----
    def attention(self, x, layer: int, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; stores this step's latent rows into the layer's pages first."""
        prefix = f"model.layers.{layer}.self_attn"
        num_tokens, heads = x.shape[0], self.num_heads
        if self.q_lora_rank is None:
            q, kv = self.projections(x, layer, "self_attn.q_kv_a_proj")
        else:
            q_a, kv = self.projections(x, layer, "self_attn.qa_kv_a_proj")
            q = self.linear(self.norm(q_a.contiguous(), prefix + ".q_a_layernorm.weight"), prefix + ".q_b_proj")
        q = q.view(num_tokens, heads, self.nope_dim + self.rope_dim)  # [T, H, nope + rope]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c = self.norm(kv[:, :self.latent_dim].contiguous(), prefix + ".kv_a_layernorm.weight")  # [T, R]
        k_rope = self.rotary.rotate(kv[:, None, self.latent_dim:], *rope)  # [T, 1, P]
        q_rope = self.rotary.rotate(q_rope, *rope)
        latent = torch.cat((c, k_rope[:, 0]), dim=-1)  # [T, R + P]: the cached row
        (cache,) = kv_cache
        store_latent(latent, cache, meta.slot_mapping)
        kv_b = self.w(prefix + ".kv_b_proj.weight").view(heads, self.nope_dim + self.v_dim, self.latent_dim)
        if meta.is_prefill:
            def expand(rows):  # [N, R + P] -> k [N, H, nope + rope], v [N, H, v_dim]
                k_nope, v = F.linear(rows[:, :self.latent_dim], kv_b.flatten(0, 1)).view(
                    rows.shape[0], heads, -1).split([self.nope_dim, self.v_dim], dim=-1)
                k_pe = rows[:, None, self.latent_dim:].expand(-1, heads, -1)
                return torch.cat((k_nope, k_pe), dim=-1), v

            out = mla_prefill(torch.cat((q_nope, q_rope), dim=-1), latent, cache, meta, self.scale, expand)
        else:
            # absorb W_uk into the query: [H, T, nope] @ [H, nope, R] -> [H, T, R]
            q_latent = torch.bmm(q_nope.transpose(0, 1), kv_b[:, :self.nope_dim])
            q_absorbed = torch.cat((q_latent.transpose(0, 1), q_rope), dim=-1)  # [T, H, R + P]
            out_latent = mla_decode(q_absorbed, cache, meta, self.scale, self.latent_dim)  # [T, H, R]
            # and W_uv into the output: [H, T, R] @ [H, R, v] -> [H, T, v]
            out = torch.bmm(out_latent.transpose(0, 1), kv_b[:, self.nope_dim:].transpose(1, 2)).transpose(0, 1)
        return self.linear(out.reshape(num_tokens, heads * self.v_dim), prefix + ".o_proj")

    # ---- feed-forward ----
    def gated_mlp(self, x: torch.Tensor, layer: int, merged: str, down: str) -> torch.Tensor:
        gate, up = self.projections(x, layer, merged)
        if self.fused and self.fused_act is not None:
            from grm_engine.kernels.gated_act import gated_act_triton

            return self.linear(gated_act_triton(gate, up, self.fused_act), down)
        return self.linear(self.act(gate) * up, down)

    def mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        prefix = f"model.layers.{layer}.mlp"
        if layer < self.first_dense:
            return self.gated_mlp(x, layer, "mlp.gate_up_proj", prefix + ".down_proj")
        ids, weights = self.router(x, self.w(prefix + ".gate.weight"))  # [T, K] each
        out = routed_experts(x, ids, weights, self.w(prefix + ".experts.gate_up_proj"),
                             self.w(prefix + ".experts.down_proj"), self.act, self.fused_act)
        if prefix + ".shared_experts.down_proj.weight" in self.weights:
            out = out + self.gated_mlp(x, layer, "mlp.shared_experts.gate_up_proj", prefix + ".shared_experts.down_proj")
        return out
