"""Multi-head latent attention (DeepSeek-V2) over a paged latent cache: the reference ops (the specification) and
their dispatchers.

Per token and layer the cache holds one row [c (kv_lora_rank), k_pe (qk_rope_head_dim)]: c is the normed KV latent,
k_pe the rotated key part shared by all heads. Keys and values are up-projections of c (kv_b_proj):
k_h = [W_uk_h c, k_pe], v_h = W_uv_h c. Prefill expands the latent to K/V and attends as usual; decode absorbs
W_uk into the query (q_h . k_h = (W_uk_h^T q_nope_h) . c + q_pe_h . k_pe) and W_uv into the output, so it reads
only the latent rows (grm_engine.kernels.mla_attention on CUDA).
"""
from __future__ import annotations

import torch

from ..attention import AttentionMetadata, attend_contiguous, attention_backend, gather_pages


class InterleavedRotary:
    """DeepSeek-V2's rotary embedding: rotates pairs (x[2i], x[2i+1]) (complex multiplication, as transformers'
    apply_rotary_emb), in fp32, with the rope config's inv_freq and attention scaling (YaRN)."""

    def __init__(self, config, rope_dim: int, max_positions: int, device):
        from .layers import rope_parameters

        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, rope_dim, 2, dtype=torch.float) / rope_dim))
            attention_scaling = 1.0
        elif rope_type in ("linear", "yarn"):
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        else:
            raise NotImplementedError(f"{config.model_type}: rope_type {rope_type!r} is not supported (default, linear, yarn are)")
        if inv_freq.numel() != rope_dim // 2:
            raise ValueError(f"{config.model_type}: rope tables of {2 * inv_freq.numel()} dims for qk_rope_head_dim={rope_dim}")
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]  # [P, D/2]
        self.cos = (freqs.cos() * attention_scaling).to(device)  # fp32, as transformers' freqs_cis
        self.sin = (freqs.sin() * attention_scaling).to(device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, D/2] fp32."""
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] -> rotated, in x's dtype (fp32 math)."""
        pairs = x.float().unflatten(-1, (-1, 2))  # [T, heads, D/2, 2]
        real, imag = pairs[..., 0], pairs[..., 1]
        return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).to(x.dtype)


def yarn_softmax_scale(config, qk_head_dim: int) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim (DeepSeek-V2's attention scale)."""
    import math

    from .layers import rope_parameters

    scale = qk_head_dim ** -0.5
    params = rope_parameters(config)
    factor, mscale_all_dim = params.get("factor", 1.0), params.get("mscale_all_dim", 0)
    if params.get("rope_type", "default") != "default" and mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


# ----------------------------------------------------------------------------------------------- the latent cache
def store_latent_reference(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent [T, R + P] -> cache [num_blocks, block_size, 1, R + P] at slot_mapping [T] (slots >= 0)."""
    cache.view(-1, cache.shape[-1])[slot_mapping] = latent


def store_latent(latent, cache, slot_mapping) -> None:
    if attention_backend(latent.device) == "triton":
        from grm_engine.kernels.mla_attention import store_latent_triton

        store_latent_triton(latent, cache, slot_mapping)
    else:
        store_latent_reference(latent, cache, slot_mapping)


# ----------------------------------------------------------------------------------------------- decode
def mla_decode_reference(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         scale: float, latent_dim: int) -> torch.Tensor:
    """q [B, H, R + P] absorbed queries (one per sequence, at position context_lens[b] - 1); cache [num_blocks,
    block_size, 1, R + P] -> latent outputs [B, H, R] in q's dtype (fp32 math)."""
    batch = q.shape[0]
    block_size = cache.shape[1]
    max_len = block_tables.shape[1] * block_size
    rows = cache[block_tables.long()].reshape(batch, max_len, cache.shape[-1]).float()  # [B, max_len, R + P]
    scores = torch.einsum("bhd,btd->bht", q.float(), rows) * scale
    visible = torch.arange(max_len, device=q.device)[None, :] < context_lens.long()[:, None]  # [B, max_len]
    probs = torch.softmax(scores.masked_fill(~visible[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("bht,btr->bhr", probs, rows[..., :latent_dim]).to(q.dtype)


def attend_latent_with_lse(q: torch.Tensor, rows: torch.Tensor, scale: float, latent_dim: int):
    """q [n, H, R + P]; rows [T, R + P], every row visible to every query -> out [n, H, R] and lse [n, H], fp32
    (T = 0: out 0, lse -inf)."""
    scores = torch.einsum("nhd,td->nht", q.float(), rows.float()) * scale
    if rows.shape[0] == 0:
        return scores.new_zeros(*scores.shape[:2], latent_dim), scores.new_full(scores.shape[:2], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("nht,tr->nhr", torch.exp(scores - lse[..., None]), rows[:, :latent_dim].float()), lse


def mla_cascade_decode_reference(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                                 context_lens: torch.Tensor, group_starts, prefix_blocks, scale: float,
                                 latent_dim: int) -> torch.Tensor:
    """The shared-prefix form of mla_decode_reference (equal to it): the samples of group g (rows
    group_starts[g]:group_starts[g+1]) attend as one stacked query [n, H, R + P] to their first prefix_blocks[g]
    shared blocks, each sample to its own rest, merged by log-sum-exp. -> [B, H, R] in q's dtype (fp32 math)."""
    from grm_engine.kernels.cascade_attention import check_groups, merge_by_lse

    starts, blocks = check_groups(group_starts, prefix_blocks, q.shape[0])
    batch, num_heads, _ = q.shape
    lens = context_lens.tolist()
    out = torch.empty(batch, num_heads, latent_dim, dtype=torch.float32, device=q.device)
    for g, num_prefix_blocks in enumerate(blocks):
        first, last = starts[g], starts[g + 1]
        prefix_len = num_prefix_blocks * cache.shape[1]
        shared = gather_pages(cache, block_tables[first], prefix_len).flatten(1)  # [prefix_len, R + P]
        out_prefix, lse_prefix = attend_latent_with_lse(q[first:last], shared, scale, latent_dim)  # the group at once
        for i, b in enumerate(range(first, last)):
            own = gather_pages(cache, block_tables[b], lens[b])[prefix_len:].flatten(1)  # [suffix_len, R + P]
            out_suffix, lse_suffix = attend_latent_with_lse(q[b:b + 1], own, scale, latent_dim)
            out[b] = merge_by_lse(out_prefix[i:i + 1], lse_prefix[i:i + 1], out_suffix, lse_suffix)[0][0]
    return out.to(q.dtype)


def mla_decode(q, cache, meta: AttentionMetadata, scale: float, latent_dim: int) -> torch.Tensor:
    """Decode attention over the latent rows; with a shared-prefix plan (meta.cascade, the decoder's grouped rows)
    the samples of a prompt read its latent pages once per row tile."""
    if attention_backend(q.device) == "triton":
        from grm_engine.kernels.mla_attention import mla_cascade_decode_attention, mla_decode_attention

        if meta.cascade is not None:
            return mla_cascade_decode_attention(q, cache, meta.block_tables, meta.context_lens, None, None, scale,
                                                latent_dim, plan=meta.cascade)
        return mla_decode_attention(q, cache, meta.block_tables, meta.context_lens, scale, latent_dim,
                                    max_context_len=meta.max_context_len, num_splits=meta.num_splits)
    return mla_decode_reference(q, cache, meta.block_tables, meta.context_lens, scale, latent_dim)


# ----------------------------------------------------------------------------------------------- prefill
def mla_prefill(q: torch.Tensor, latent: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                expand) -> torch.Tensor:
    """q [T, H, nope + rope] (rotated); latent [T, R + P] this step's rows (already stored); expand(rows [N, R + P])
    -> (k [N, H, nope + rope], v [N, H, v_dim]) up-projects a sequence's rows. Each sequence attends causally to
    its cached tokens (read back from the pages) and its new ones. -> [T, H, v_dim]."""
    outputs = []
    for b in range(len(meta.num_cached)):
        start, end = meta.query_starts[b], meta.query_starts[b + 1]
        cached = meta.num_cached[b]
        if cached == 0:  # the chunk holds the whole context: no need to read the pages back
            rows = latent[start:end]
        else:
            rows = gather_pages(cache, meta.block_tables[b], cached + end - start).flatten(1)  # [N, R + P]
        keys, values = expand(rows)
        outputs.append(attend_contiguous(q[start:end], keys, values, cached, scale))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
