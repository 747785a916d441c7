"""DeepSeek-V2-Lite shape in the decoder (random init, bf16; no downloads): MLA over a paged latent cache, fused MoE.

Kernel rows first: MLA decode at the step's shape (256 sequences in groups of 32 sharing 2,048 tokens' latent pages,
private suffixes of 64-192), the per-sequence kernel against the shared-prefix (cascade) kernel by tile choice and
split size, with the floors (unique latent bytes, per-sequence latent bytes) over the measured bandwidth; then the
routed experts of one layer by tile choice.
One end-to-end case: 8 prompts x 2,048 tokens, n = 32 samples each, 256 new tokens (ignore_eos); the samples of a
prompt share its 128 full pages, so decode takes the shared-prefix path (shared_prefix_path says it ran), and the
same run on the private path (cascade_attention=False) gives private_step_ms. Reported:
- our tok/s (prefill included) and decode step time against its floor: (weights read per step + latent KV) over
  the measured bandwidth. Weights read per step = every non-embedding weight except the routed experts no token
  of the step picks; at 256 sequences x top-6 of 64 every expert is picked, so that is all of them. Two floors:
  unique latent KV (each prompt's rows once: the shared-prefix bound) and per-sequence latent KV (each sequence
  reads its own context, as the plain MLA kernel does without L2 reuse).
- KV bytes per token: the latent row (kv_lora_rank + qk_rope_head_dim per layer) against the full K/V layout
  (num_heads x (qk_nope + qk_rope + v_head) per layer) that an expanded cache would hold.
- transformers generate in the same run, capped: one prompt with num_return_sequences = 32 (all 8 prompts at once
  would need ~160 GB of expanded K/V), timed for 1 and 1 + HF_NEW new tokens; its per-step time extrapolates the
  full workload as 8 prompts one after another x (prefill + 256 steps). Both the measured capped tok/s and the
  extrapolated total are reported; speedup_vs_hf uses the extrapolation.
A torch.profiler table of decode steps goes to $OUT/decode_profile_deepseek_v2.txt.
"""
from __future__ import annotations

import gc
import itertools
import os
import time

import torch

from gpu_decode import profile_decode, timed_generate

LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
            num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
            v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408,
            first_k_dense_replace=1, routed_scaling_factor=1.0, topk_method="greedy", norm_topk_prob=False,
            max_position_embeddings=163840, tie_word_embeddings=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                             "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                             "original_max_position_embeddings": 4096})
NUM_PROMPTS, PROMPT_LEN, N, NEW_TOKENS = 8, 2048, 32, 256
HF_NEW = 16  # transformers: new tokens of its timed run (one prompt, n = 32)
QUICK = dict(num_hidden_layers=4)
KERNEL_SEQS = (256, 32, 2048, (64, 192))  # kernel rows: sequences, samples per prompt, shared prefix, private suffixes
KERNEL_MOE = (2048, 1408, 64, 6)  # kernel rows: hidden, moe_intermediate, routed experts, top-k
DEVICE = "cuda"  # a CPU smoke run of this file sets "cpu" (and gpu_decode.DEVICE) with a tiny shape


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def build_model(shape: dict):
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(DeepseekV2Config(**shape), dtype=torch.bfloat16)
    for name, param in model.named_parameters():  # the router stays fp32, as from_pretrained keeps it
        if name.endswith("mlp.gate.weight"):
            param.data = param.data.float()
    return model.eval()


def byte_counts(config) -> dict:
    layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    latent_row = config.kv_lora_rank + config.qk_rope_head_dim
    full_row = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    moe_layers = layers - config.first_k_dense_replace
    expert = 3 * hidden * config.moe_intermediate_size * 2  # one routed expert's weights, bf16
    return {"latent_per_token": layers * latent_row * 2, "full_kv_per_token": layers * full_row * 2,
            "routed_expert": expert, "moe_layers": moe_layers}


def read_bytes(model, experts_active_per_layer: float) -> float:
    """Weights a decode step reads: all but the embedding table and the routed experts nobody picked."""
    counts = byte_counts(model.config)
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    inactive = model.config.n_routed_experts - experts_active_per_layer
    return total - counts["moe_layers"] * inactive * counts["routed_expert"]


def hf_generate_s(model, prompt, n, new_tokens) -> float:
    ids = torch.tensor([prompt], device=DEVICE)
    _sync()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                   num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    _sync()
    return time.perf_counter() - start


def shared_prefix_batch(batch: int, group: int, prefix: int, suffix_range: tuple[int, int], block_size: int, row: int):
    """Latent pages for `batch` sequences in groups of `group` sharing `prefix` tokens' pages (as forked samples),
    each with a private suffix of suffix_range tokens (random, fixed seed). -> cache, tables, lens, starts, blocks."""
    g = torch.Generator().manual_seed(0)
    suffixes = torch.randint(suffix_range[0], suffix_range[1] + 1, (batch,), generator=g)  # [B]
    prefix_blocks, num_groups = prefix // block_size, batch // group
    own_blocks = (suffixes + block_size - 1) // block_size  # [B]
    num_blocks = num_groups * prefix_blocks + int(own_blocks.sum())
    cache = torch.randn(num_blocks, block_size, 1, row, device=DEVICE, dtype=torch.bfloat16)
    width = prefix_blocks + int(own_blocks.max())
    tables = torch.zeros(batch, width, dtype=torch.int32)  # [B, width], 0-padded
    next_block = num_groups * prefix_blocks
    for b in range(batch):
        tables[b, :prefix_blocks] = torch.arange(prefix_blocks) + (b // group) * prefix_blocks
        tables[b, prefix_blocks:prefix_blocks + own_blocks[b]] = torch.arange(int(own_blocks[b])) + next_block
        next_block += int(own_blocks[b])
    lens = (prefix + suffixes).to(torch.int32)
    starts, blocks = list(range(0, batch + 1, group)), [prefix_blocks] * num_groups
    return cache, tables.to(DEVICE), lens.to(DEVICE), starts, blocks


def kernel_rows(args) -> list[dict]:
    """The new kernels alone at the decode step's shape (256 sequences) against bandwidth: MLA decode where groups of
    32 share 2,048 tokens' latent pages (forked samples) plus private suffixes of 64-192 tokens, by the per-sequence
    kernel and by the shared-prefix kernel (by tile choice); then the routed experts of one layer."""
    from triton.testing import do_bench

    from grm_engine.kernels.cascade_attention import plan_cascade
    from grm_engine.kernels.mla_attention import MLA_BLOCK_N, mla_cascade_decode_attention, mla_decode_attention

    bandwidth = args.ceilings.get("bandwidth", 4.2e12)
    rows = []
    batch, group, prefix, suffix_range = KERNEL_SEQS
    block_size, row, latent, heads = 16, 576, 512, 16
    cache, tables, lens, starts, blocks = shared_prefix_batch(batch, group, prefix, suffix_range, block_size, row)
    q = torch.randn(batch, heads, row, device=DEVICE, dtype=torch.bfloat16)
    total_tokens = int(lens.sum())
    per_seq_bytes = total_tokens * row * 2
    unique_bytes = (len(blocks) * prefix + total_tokens - batch * prefix) * row * 2
    case = f"MLA decode {batch} seqs, groups of {group} share {prefix} + own {suffix_range[0]}-{suffix_range[1]}"
    floors = {"floor_unique_ms": 1e3 * unique_bytes / bandwidth, "floor_per_seq_ms": 1e3 * per_seq_bytes / bandwidth}

    def bench(fn):
        return do_bench(fn, warmup=10, rep=100, return_mode="median")

    per_seq = mla_decode_attention(q, cache, tables, lens, 0.1, latent)
    per_seq_ms = bench(lambda: mla_decode_attention(q, cache, tables, lens, 0.1, latent))
    rows.append({"section": "deepseek_v2", "case": f"{case}: per-sequence kernel, default tiles", "ours_ms": per_seq_ms,
                 **floors, "GB/s_unique": unique_bytes / per_seq_ms / 1e6})
    for block_n in (16, 32, 64):
        for splits in (1, 2):
            try:
                ms = bench(lambda: mla_decode_attention(q, cache, tables, lens, 0.1, latent, num_splits=splits,
                                                        block_n=block_n))
            except Exception as error:  # e.g. out of shared memory for this tile
                rows.append({"section": "deepseek_v2", "case": f"{case}: per-sequence block_n={block_n} splits={splits}",
                             "error": f"{type(error).__name__}: {str(error)[:80]}"})
                continue
            rows.append({"section": "deepseek_v2", "case": f"{case}: per-sequence block_n={block_n} splits={splits}",
                         "ours_ms": ms, **floors, "GB/s_unique": unique_bytes / ms / 1e6})
    # the shared-prefix kernel; the plan is built once per decode step for all layers, so it is not timed.
    # Tiles: block_m (stacked rows) x split by default; GRM_BENCH_MLA_SWEEP=full adds block_n and the prefix warps.
    full = os.environ.get("GRM_BENCH_MLA_SWEEP", "") == "full"
    max_len = int(lens.max())
    for block_m, block_n, warps in itertools.product((16, 32, 64), (16, 32, 64) if full else (MLA_BLOCK_N,),
                                                     (4, 8) if full else (None,)):
        for split_tokens in (512, 1024, 2048):
            label = f"{case}: shared-prefix block_m={block_m} block_n={block_n} split={split_tokens} warps={warps or 'default'}"
            plan = plan_cascade(starts, blocks, block_size, heads, 1, max_len, DEVICE, split_tokens, block_m)
            kwargs = dict(plan=plan, block_n=block_n, prefix_warps=warps)
            try:
                out = mla_cascade_decode_attention(q, cache, tables, lens, None, None, 0.1, latent, **kwargs)
                ms = bench(lambda: mla_cascade_decode_attention(q, cache, tables, lens, None, None, 0.1, latent, **kwargs))
            except Exception as error:
                rows.append({"section": "deepseek_v2", "case": label, "error": f"{type(error).__name__}: {str(error)[:80]}"})
                continue
            rows.append({"section": "deepseek_v2", "case": label, "ours_ms": ms, "per_seq_ms": per_seq_ms,
                         "speedup_vs_per_seq": per_seq_ms / ms, **floors, "GB/s_unique": unique_bytes / ms / 1e6,
                         "max_diff_vs_per_seq": (out.float() - per_seq.float()).abs().max().item()})
    from grm_engine.decode.models.deepseek_v2 import DeepseekV2ForCausalLM

    plan = plan_cascade(starts, blocks, block_size, heads, 1, max_len, DEVICE, **DeepseekV2ForCausalLM.cascade_plan_options)
    ms = bench(lambda: mla_cascade_decode_attention(q, cache, tables, lens, None, None, 0.1, latent, plan=plan))
    rows.append({"section": "deepseek_v2", "case": f"{case}: shared-prefix, the decoder's plan and tiles",
                 "ours_ms": ms, "per_seq_ms": per_seq_ms, "speedup_vs_per_seq": per_seq_ms / ms, **floors,
                 "GB/s_unique": unique_bytes / ms / 1e6})
    return rows + moe_kernel_rows(batch, bandwidth)


def moe_kernel_rows(batch: int, bandwidth: float) -> list[dict]:
    from triton.testing import do_bench

    from grm_engine.decode.models.moe import routed_experts_reference
    from grm_engine.kernels.moe import fused_moe

    rows = []
    hidden, inter, experts, top_k = KERNEL_MOE
    x = torch.randn(batch, hidden, device=DEVICE, dtype=torch.bfloat16)
    gate_up = torch.randn(experts, 2 * inter, hidden, device=DEVICE, dtype=torch.bfloat16) * 0.02
    down = torch.randn(experts, hidden, inter, device=DEVICE, dtype=torch.bfloat16) * 0.02
    weights, ids = torch.topk(torch.randn(batch, experts, device=DEVICE).softmax(-1), top_k, dim=-1)
    weight_bytes = 3 * experts * hidden * inter * 2
    ref_ms = do_bench(lambda: routed_experts_reference(x, ids, weights, gate_up, down, torch.nn.functional.silu),
                      warmup=3, rep=20, return_mode="median")
    for block_m, block_n, block_k in ((16, 64, 64), (32, 64, 64), (64, 64, 64), (64, 128, 64), (32, 128, 128)):
        try:
            ms = do_bench(lambda: fused_moe(x, ids, weights, gate_up, down, block_m=block_m, block_n=block_n,
                                            block_k=block_k), warmup=10, rep=100, return_mode="median")
        except Exception as error:
            rows.append({"section": "deepseek_v2", "case": f"MoE block {block_m}x{block_n}x{block_k}",
                         "error": f"{type(error).__name__}: {str(error)[:80]}"})
            continue
        rows.append({"section": "deepseek_v2", "case": f"routed experts {batch} tokens top-{top_k} of {experts} block {block_m}x{block_n}x{block_k}",
                     "ours_ms": ms, "ref_ms": ref_ms, "floor_ms": 1e3 * weight_bytes / bandwidth,
                     "GB/s": weight_bytes / ms / 1e6})
    default_ms = do_bench(lambda: fused_moe(x, ids, weights, gate_up, down), warmup=10, rep=100, return_mode="median")
    rows.append({"section": "deepseek_v2", "case": f"routed experts {batch} tokens, default tiles", "ours_ms": default_ms,
                 "ref_ms": ref_ms, "floor_ms": 1e3 * weight_bytes / bandwidth, "GB/s": weight_bytes / default_ms / 1e6})
    return rows


def used_shared_prefix(decoder) -> bool:
    """Whether some decode step ran the shared-prefix (cascade) path (a step shape with a work list)."""
    graphs = decoder.runner.graphs
    return graphs is not None and any(key.cascade is not None for key in graphs.buffers)


def run(args) -> list[dict]:
    rows = kernel_rows(args)
    _sync()
    return rows + model_rows(args)


def model_rows(args) -> list[dict]:
    from grm_engine.decode import Decoder, SamplingParams

    quick = getattr(args, "quick", False)
    shape = {**LITE, **(QUICK if quick else {})}
    num_prompts, prompt_len = (2, 512) if quick else (NUM_PROMPTS, PROMPT_LEN)
    model = build_model(shape)
    config = model.config
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(num_prompts)]
    decoder = Decoder.from_pretrained(model, kv_cache_memory_fraction=0.5, max_num_seqs=256, block_size=16,
                                      merge_projections=True, num_kv_blocks=None if DEVICE == "cuda" else 2048)
    seconds, outputs = timed_generate(decoder, prompts, N, NEW_TOKENS, "deepseek_v2")
    stats = decoder.stats
    generated = num_prompts * N * NEW_TOKENS
    counts = byte_counts(config)
    batch = num_prompts * N
    experts = config.n_routed_experts
    active = experts * (1 - (1 - config.num_experts_per_tok / experts) ** batch)  # expected distinct experts per layer
    weights_read = read_bytes(model, active)
    mid_context = prompt_len + NEW_TOKENS / 2
    unique_kv = (num_prompts * prompt_len + batch * NEW_TOKENS / 2) * counts["latent_per_token"]
    per_seq_kv = batch * mid_context * counts["latent_per_token"]
    bandwidth = args.ceilings.get("bandwidth", 4.2e12)
    step_ms = 1e3 * stats.decode_seconds / max(stats.decode_steps, 1)
    floor_ms = 1e3 * (weights_read + unique_kv) / bandwidth
    row = {
        "section": "deepseek_v2", "case": f"V2-Lite shape {num_prompts}x{prompt_len} n={N} +{NEW_TOKENS}",
        "tok/s": generated / seconds, "total_s": seconds, "prefill_s": stats.prefill_seconds,
        "ours_ms": step_ms, "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / step_ms,
        "floor_per_seq_kv_ms": 1e3 * (weights_read + per_seq_kv) / bandwidth,
        "weights_read_GB": weights_read / 1e9, "active_experts": active,
        "latent_B/token": counts["latent_per_token"], "full_kv_B/token": counts["full_kv_per_token"],
        "kv_ratio": counts["full_kv_per_token"] / counts["latent_per_token"],
        "prefill_tokens": stats.prefill_tokens, "peak_KV_GB": stats.peak_blocks_in_use * 16 * counts["latent_per_token"] / 1e9,
        "preemptions": stats.preemptions, "cuda_graphs": stats.extra.get("cuda_graphs"),
    }
    row["shared_prefix_path"] = used_shared_prefix(decoder)
    out_dir = os.environ.get("OUT", ".")
    row["profile_top"] = profile_decode(decoder, prompts, SamplingParams(n=N, max_tokens=14, ignore_eos=True, seed=0),
                                        os.path.join(out_dir, "decode_profile_deepseek_v2.txt"))
    del decoder, outputs
    gc.collect()
    _sync()
    # the same run on the private path (every sample reads the whole prompt's latent rows): what sharing gains
    private = Decoder.from_pretrained(model, kv_cache_memory_fraction=0.5, max_num_seqs=256, block_size=16,
                                      merge_projections=True, cascade_attention=False,
                                      num_kv_blocks=None if DEVICE == "cuda" else 2048)
    private_seconds, outputs = timed_generate(private, prompts, N, NEW_TOKENS, "deepseek_v2 private")
    private_step_ms = 1e3 * private.stats.decode_seconds / max(private.stats.decode_steps, 1)
    row.update({"private_tok/s": generated / private_seconds, "private_step_ms": private_step_ms,
                "step_speedup_vs_private": private_step_ms / step_ms})
    del private, outputs
    gc.collect()
    _sync()
    try:  # transformers: one prompt, n = 32; prefill alone, then prefill + HF_NEW steps
        if float(os.environ.get("GRM_BENCH_HF_BUDGET_S", "1")) <= 0:
            raise RuntimeError("skipped (GRM_BENCH_HF_BUDGET_S=0)")
        hf_prefill = hf_generate_s(model, prompts[0], N, 1)
        hf_run = hf_generate_s(model, prompts[0], N, 1 + HF_NEW)
        hf_step = (hf_run - hf_prefill) / HF_NEW
        hf_total = num_prompts * (hf_prefill + (NEW_TOKENS - 1) * hf_step)
        row.update({"hf_tok/s_measured": N * (1 + HF_NEW) / hf_run, "hf_step_ms": 1e3 * hf_step,
                    "hf_prefill_s": hf_prefill, "hf_total_s_extrapolated": hf_total,
                    "speedup_vs_hf": hf_total / seconds})
    except torch.OutOfMemoryError as error:
        row["hf_error"] = f"out of memory: {str(error)[:80]}"
    except RuntimeError as error:
        row["hf_error"] = str(error)[:80]
    del model
    gc.collect()
    _sync()
    print(f"[deepseek_v2] {row['tok/s']:.0f} tok/s, step {step_ms:.2f} ms vs floor {floor_ms:.2f} ms (shared-prefix "
          f"path: {row['shared_prefix_path']}; private path {private_step_ms:.2f} ms), "
          f"transformers x{row.get('speedup_vs_hf', float('nan')):.1f}", flush=True)
    return [{k: v for k, v in row.items() if v is not None}]
