"""Prefill benchmark: (a) attention alone, the varlen paged prefill kernel (kernels/varlen_attention.py) vs the
per-sequence SDPA loop it replaces (prefill_attention_reference) and vs one F.scaled_dot_product_attention call on
the padded batch (given its own [B, H, S, D] layout for free: a floor-ish peer where lengths are equal and nothing
is cached); every tile config in CANDIDATES is timed too, and the keys read straight from k/v (no pages) when
nothing is cached; (b) whole-model prefill through Decoder (random-init Qwen2.5-7B shape, bf16, 8 x 2,048-token
prompts, one new token), our kernel vs the loop, against the issue's target (<= 0.45 s) and the matmul floor.

TFLOP/s counts the visible (query, key) pairs only (causal, window): 4 * D * H flops per pair. floor_s: the
model's matmul flops (2 * matmul weights * tokens) plus attention flops at the measured bf16 matmul rate.
A torch.profiler table of one model prefill goes to $OUT/prefill_profile.txt.
"""
from __future__ import annotations

import gc
import os
import time
import traceback

import torch

DEVICE, DTYPE, BLOCK_SIZE = "cuda", torch.bfloat16, 16
ATTENTION_CASES = [  # name, heads, kv_heads, head_dim, [(num_cached, num_new)] per sequence, window, softcap
    ("qwen2.5-7B 8x2048", 28, 4, 128, [(0, 2048)] * 8, None, None),
    ("qwen2.5-7B 8x(1536 cached + 512)", 28, 4, 128, [(1536, 512)] * 8, None, None),
    ("qwen2.5-0.5B 16x300..1200", 14, 2, 64, [(0, 300 + 60 * i) for i in range(16)], None, None),
    ("qwen2.5-0.5B 16x(512 template cached + 300..1200)", 14, 2, 64, [(512, 300 + 60 * i) for i in range(16)], None, None),
    ("gemma2-2B 4x1024 w4096 cap50", 8, 4, 256, [(0, 1024)] * 4, 4096, 50.0),
]
MODEL_SHAPE = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)
MODEL_PROMPTS, MODEL_PROMPT_LEN, TARGET_S = 8, 2048, 0.45


def bench_ms(fn) -> float:
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def visible_pairs(spans, window) -> int:
    total = 0
    for cached, new in spans:
        if window is None:
            total += new * cached + new * (new + 1) // 2
        else:
            total += sum(min(cached + i + 1, window) for i in range(new))
    return total


def build_step(spans, num_heads, kv_heads, head_dim, seed=0):
    """Pages scattered over a pool (noise where cached), the new K/V stored into them; q/k/v as column views of
    one merged projection output, as the decoder has them. Returns q, k, v, k_cache, v_cache, meta."""
    from grm_engine.decode.attention import AttentionMetadata, store_kv_reference

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    blocks = [-(-(cached + new) // BLOCK_SIZE) for cached, new in spans]
    num_blocks = sum(blocks) + 1
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=g)
    v_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=g)
    pool = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = torch.zeros(len(spans), max(blocks), dtype=torch.int32)
    slots, query_starts = [], [0]
    for b, ((cached, new), n) in enumerate(zip(spans, blocks)):
        tables[b, :n] = torch.tensor(pool[:n], dtype=torch.int32)
        pool = pool[n:]
        positions = torch.arange(cached, cached + new)
        slots.append(tables[b, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE)
        query_starts.append(query_starts[-1] + new)
    tokens = query_starts[-1]
    qkv = torch.randn(tokens, (num_heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=DTYPE, generator=g)
    q, k, v = qkv.split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, num_heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slot_mapping = torch.cat(slots).to(DEVICE)
    store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    context_lens = [cached + new for cached, new in spans]
    num_cached = [cached for cached, _ in spans]
    meta = AttentionMetadata(
        is_prefill=True, slot_mapping=slot_mapping, block_tables=tables.to(DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE), query_starts=query_starts,
        num_cached=num_cached, max_context_len=max(context_lens),
        query_starts_device=torch.tensor(query_starts, dtype=torch.int32, device=DEVICE),
        num_cached_device=torch.tensor(num_cached, dtype=torch.int32, device=DEVICE),
        max_query_len=max(new for _, new in spans))
    return q, k, v, k_cache, v_cache, meta


def attention_rows(args, name, num_heads, kv_heads, head_dim, spans, window, softcap) -> list[dict]:
    import torch.nn.functional as F

    from grm_engine.decode.attention import prefill_attention_reference
    from grm_engine.kernels.varlen_attention import CANDIDATES, tile_config, varlen_prefill_attention

    q, k, v, k_cache, v_cache, meta = build_step(spans, num_heads, kv_heads, head_dim)
    scale = head_dim ** -0.5
    flops = 4 * head_dim * num_heads * visible_pairs(spans, window)
    matmul = args.ceilings.get("matmul", 760e12)
    any_cached = any(meta.num_cached)

    def ours(config=None, packed=None):
        return varlen_prefill_attention(q, k, v, k_cache, v_cache, meta.block_tables, meta.query_starts_device,
                                        meta.num_cached_device, scale, max_query_len=meta.max_query_len, window=window,
                                        softcap=softcap, any_cached=any_cached, config=config, packed_when_uncached=packed)

    loop = lambda: prefill_attention_reference(q, k, v, k_cache, v_cache, meta, scale, window, softcap)  # noqa: E731
    reference = loop()
    loop_ms = bench_ms(loop)
    default = tile_config(head_dim, q.dtype)
    rows = []
    variants = [(f"{c.block_m}/{c.block_n}/{c.num_warps}w/{c.num_stages}s", c, None)
                for c in CANDIDATES.get(head_dim, [default])]
    if not any_cached:  # the pages vs the packed k/v, at the default tiles
        variants += [("default, keys from pages", default, False), ("default, keys from k/v", default, True)]
    for label, config, packed in variants:
        try:
            out = ours(config, packed)
            ms = bench_ms(lambda: ours(config, packed))
        except Exception as error:  # a config that does not fit (shared memory, registers) is a row, not a crash
            rows.append({"section": "prefill", "case": f"{name} [{label}]", "error": f"{type(error).__name__}: {str(error)[:100]}"})
            continue
        rows.append({"section": "prefill", "case": f"{name} [{label}]" + (" *" if config == default else ""),
                     "ours_ms": ms, "loop_ms": loop_ms, "speedup_vs_loop": loop_ms / ms, "TFLOP/s": flops / ms / 1e9,
                     "pct_matmul": 100 * flops / (ms * 1e-3) / matmul,
                     "max_err_vs_loop": (out.float() - reference.float()).abs().max().item()})
    if not any_cached and len({new for _, new in spans}) == 1 and window is None and softcap is None:
        batch, seq_len = len(spans), spans[0][1]
        qp = q.reshape(batch, seq_len, num_heads, head_dim).transpose(1, 2).contiguous()  # [B, H, S, D]
        kp = k.reshape(batch, seq_len, kv_heads, head_dim).transpose(1, 2).contiguous()
        vp = v.reshape(batch, seq_len, kv_heads, head_dim).transpose(1, 2).contiguous()
        group = num_heads // kv_heads
        kr, vr = kp.repeat_interleave(group, dim=1), vp.repeat_interleave(group, dim=1)
        for label, fn in [("gqa", lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)),
                          ("kv repeated", lambda: F.scaled_dot_product_attention(qp, kr, vr, is_causal=True))]:
            ms = bench_ms(fn)
            rows.append({"section": "prefill", "case": f"{name} [peer: SDPA padded batch, {label}]", "ours_ms": ms,
                         "TFLOP/s": flops / ms / 1e9, "pct_matmul": 100 * flops / (ms * 1e-3) / matmul})
    return rows


def matmul_weights(shape: dict) -> int:
    """Weights multiplied per prompt token in prefill (the head runs only on each prompt's last token)."""
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = hidden // shape["num_attention_heads"]
    qkv = hidden * (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    return layers * (qkv + hidden * hidden + 3 * hidden * inter)


def model_prefill_rows(args) -> list[dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from grm_engine.decode import Decoder, SamplingParams
    from grm_engine.decode.attention import prefill_attention, prefill_attention_reference
    from grm_engine.decode.models import llama

    config = AutoConfig.for_model("qwen2", max_position_embeddings=8192, **MODEL_SHAPE)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE).eval()
    g = torch.Generator().manual_seed(3)
    vocab = MODEL_SHAPE["vocab_size"]
    prompts = lambda: [torch.randint(10, vocab, (MODEL_PROMPT_LEN,), generator=g).tolist()  # noqa: E731
                       for _ in range(MODEL_PROMPTS)]
    params = SamplingParams(n=1, temperature=0, max_tokens=1, ignore_eos=True)
    tokens = MODEL_PROMPTS * MODEL_PROMPT_LEN
    heads, head_dim = MODEL_SHAPE["num_attention_heads"], MODEL_SHAPE["hidden_size"] // MODEL_SHAPE["num_attention_heads"]
    flops = 2 * matmul_weights(MODEL_SHAPE) * tokens + MODEL_SHAPE["num_hidden_layers"] * 4 * head_dim * heads * visible_pairs(
        [(0, MODEL_PROMPT_LEN)] * MODEL_PROMPTS, None)
    floor_s = flops / args.ceilings.get("matmul", 760e12)
    rows = []
    for batched in (8192, 16384):
        decoder = Decoder.from_pretrained(model, kv_cache_memory_fraction=0.6, block_size=BLOCK_SIZE,
                                          max_num_batched_tokens=batched)
        row = {"section": "prefill", "case": f"qwen2.5-7B model prefill {MODEL_PROMPTS}x{MODEL_PROMPT_LEN}, "
                                             f"{batched} tokens/step", "floor_s": floor_s, "target_s": TARGET_S}
        for label, fn in (("ours_s", prefill_attention), ("loop_s", prefill_attention_reference)):
            llama.prefill_attention = fn
            try:
                decoder.generate(prompts(), params, use_tqdm=False)  # warm: compiles, allocator
                times = []
                for _ in range(3):
                    decoder.generate(prompts(), params, use_tqdm=False)  # fresh prompts: no prefix-cache hits
                    assert decoder.stats.prefix_cache_hit_tokens == 0 and decoder.stats.prefill_tokens == tokens
                    times.append(decoder.stats.prefill_seconds)
                row[label] = sorted(times)[1]
                row["prefill_steps"] = decoder.stats.prefill_steps
            finally:
                llama.prefill_attention = prefill_attention
        row.update(pct_floor=100 * floor_s / row["ours_s"], speedup_vs_loop=row["loop_s"] / row["ours_s"],
                   meets_target=row["ours_s"] <= TARGET_S)
        if batched == 8192 and DEVICE == "cuda":
            row["profile_top"] = profile_prefill(decoder, prompts(), params)
        rows.append(row)
        del decoder
        free_memory()
    return rows


def free_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def profile_prefill(decoder, prompts, params) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.generate(prompts, params, use_tqdm=False)
    averages = prof.key_averages()
    with open(os.path.join(os.environ.get("OUT", "."), "prefill_profile.txt"), "w") as f:
        f.write("one model prefill (8 x 2048 tokens, our kernel)\n")
        f.write(averages.table(sort_by="self_device_time_total", row_limit=25))
    top = sorted(averages, key=lambda e: -e.self_device_time_total)[:4]
    total = sum(e.self_device_time_total for e in averages) or 1
    return ", ".join(f"{e.key[:36]} {100 * e.self_device_time_total / total:.0f}%" for e in top)


def run(args) -> list[dict]:
    rows = []
    for case in ATTENTION_CASES:
        start = time.time()
        try:
            rows += attention_rows(args, *case)
        except Exception as error:  # one broken case must not hide the others
            traceback.print_exc()
            rows.append({"section": "prefill", "case": case[0], "error": f"{type(error).__name__}: {str(error)[:120]}"})
        print(f"[prefill] {case[0]}: {time.time() - start:.1f} s", flush=True)
        free_memory()
    if not getattr(args, "quick", False):
        try:
            rows += model_prefill_rows(args)
        except Exception as error:
            traceback.print_exc()
            rows.append({"section": "prefill", "case": "qwen2.5-7B model prefill", "error": f"{type(error).__name__}: {str(error)[:120]}"})
    return rows


if __name__ == "__main__":  # CPU smoke run of the code path: TRITON_INTERPRET=1 python bench/gpu_prefill.py
    import types

    os.environ.setdefault("GRM_ENGINE_BACKEND", "triton")
    DEVICE, DTYPE = "cpu", torch.float32
    ATTENTION_CASES = [("tiny", 4, 2, 32, [(0, 40)] * 2, None, None), ("tiny cached", 4, 2, 32, [(20, 9), (0, 30)], 16, 5.0)]
    MODEL_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=96, vocab_size=384, tie_word_embeddings=False)
    MODEL_PROMPTS, MODEL_PROMPT_LEN = 2, 24
    for r in run(types.SimpleNamespace(quick=False, ceilings={"matmul": 1e11})):
        print(r)
