"""Decoder benchmark: random-init models at real shapes (no downloads), ignore_eos, vs transformers generate.

Per case: our tok/s and decode step time against the floor (weights + unique KV bytes over the measured
bandwidth), prefill tokens (each prompt once), peak KV blocks, and transformers generate(num_return_sequences=n)
in the same run (fewer new tokens, to fit the time budget; its tok/s is reported as measured). ref_ms is the
decode step with the reference attention path (gather pages + fp32 math) where affordable. A torch.profiler
table of decode steps goes to $OUT/decode_profile_<case>.txt.
"""
from __future__ import annotations

import gc
import os
import time
import traceback

import torch

CASES = [
    # name, model_type, config, prompts, prompt tokens, n, new tokens, transformers: prompts, new tokens
    ("qwen2.5-0.5B", "qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
     1, 1024, 32, 256, 1, 64),
    ("qwen2.5-7B", "qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
     8, 2048, 32, 256, 2, 32),
    ("gemma2-2B", "gemma2", dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=256, intermediate_size=9216, vocab_size=256000, query_pre_attn_scalar=256,
                                sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
     2, 1024, 32, 256, 1, 64),
]
# transformers baselines start only before this point, so the section ends within 4 minutes;
# GRM_BENCH_HF_BUDGET_S=0 skips them (a re-run that only needs our numbers)
HF_BUDGET_S = float(os.environ.get("GRM_BENCH_HF_BUDGET_S", "170"))
DEVICE = "cuda"  # a CPU smoke run of this file sets "cpu" with tiny CASES
QUICK = {"qwen2.5-0.5B": (1, 256, 8, 32, 1, 16), "qwen2.5-7B": (2, 512, 8, 32, 1, 8), "gemma2-2B": (1, 256, 8, 32, 1, 16)}


def build_model(model_type: str, shape: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, max_position_embeddings=8192, **shape)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def kv_bytes_per_token(model) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def profile_decode(decoder, prompts, params, path: str) -> str:
    """Profile 5 decode steps after 5 + 2 warm ones; returns the top op names."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    steps = decoder.config.num_scheduler_steps
    decoder.config.num_scheduler_steps = 1  # one hook call per decode step (rounds would call it once per round)
    try:
        with profile(activities=activities, schedule=schedule(wait=5, warmup=2, active=5)) as prof:
            decoder.step_hook = lambda batch: None if batch.is_prefill else prof.step()
            decoder.generate(prompts, params, use_tqdm=False)
            decoder.step_hook = None
    finally:
        decoder.config.num_scheduler_steps = steps
    averages = prof.key_averages()
    table = averages.table(sort_by="self_device_time_total", row_limit=30)
    with open(path, "w") as f:
        f.write("decode steps: 5 profiled (self device time is the total over 5 steps)\n" + table + "\n")
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=20))
    top = sorted(averages, key=lambda e: -e.self_device_time_total)[:3]
    total = sum(e.self_device_time_total for e in averages) or 1
    return ", ".join(f"{e.key[:40]} {100 * e.self_device_time_total / total:.0f}%" for e in top)


def reference_attention_step_ms(decoder, prompts, n) -> float:
    """Decode step time with the reference attention (gather pages + fp32 math) instead of the Triton kernel."""
    from grm_engine.decode import SamplingParams

    previous = os.environ.get("GRM_ENGINE_BACKEND")
    os.environ["GRM_ENGINE_BACKEND"] = "reference"
    try:
        decoder.generate(prompts, SamplingParams(n=n, max_tokens=16, ignore_eos=True, seed=0), use_tqdm=False)
    finally:
        if previous is None:
            del os.environ["GRM_ENGINE_BACKEND"]
        else:
            os.environ["GRM_ENGINE_BACKEND"] = previous
    return 1e3 * decoder.stats.decode_seconds / max(decoder.stats.decode_steps, 1)


def transformers_generate(model, prompts, n, new_tokens) -> dict:
    ids = torch.tensor(prompts, device=DEVICE)
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                   num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    _sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else None
    return {"hf_tok/s": len(prompts) * n * new_tokens / seconds, "hf_s": seconds, "hf_new_tokens": new_tokens,
            "hf_prompts": len(prompts), "hf_peak_GB": peak}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def timed_generate(decoder, prompts, n: int, new_tokens: int, name: str):
    """A 4-token warm-up call (compiles the Triton kernels for this shape), then the timed call: n samples of every
    prompt, new_tokens each (ignore_eos). -> (seconds, outputs); checks every token was generated."""
    from grm_engine.decode import SamplingParams

    decoder.generate(prompts, SamplingParams(n=n, temperature=1.0, max_tokens=4, ignore_eos=True, seed=1), use_tqdm=False)
    params = SamplingParams(n=n, temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=0)
    _sync()
    start = time.perf_counter()
    outputs = decoder.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(s.token_ids) for r in outputs for s in r.outputs)
    assert generated == len(prompts) * n * new_tokens, f"{name}: {generated} tokens generated"
    return seconds, outputs


def run_case(args, section_start, name, model_type, shape, num_prompts, prompt_len, n, new_tokens, hf_prompts,
             hf_new_tokens) -> dict:
    from grm_engine.decode import Decoder, SamplingParams

    model = build_model(model_type, shape)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, shape["vocab_size"], (prompt_len,), generator=g).tolist() for _ in range(num_prompts)]
    decoder = Decoder.from_pretrained(model, kv_cache_memory_fraction=0.85, max_num_seqs=256, block_size=16,
                                      num_kv_blocks=None if DEVICE == "cuda" else 4096)
    seconds, outputs = timed_generate(decoder, prompts, n, new_tokens, name)
    stats = decoder.stats
    generated = num_prompts * n * new_tokens
    step_ms = 1e3 * stats.decode_seconds / max(stats.decode_steps, 1)
    unique_kv = (num_prompts * prompt_len + num_prompts * n * new_tokens / 2) * kv_bytes_per_token(model)  # mid-run
    bandwidth = args.ceilings.get("bandwidth", 4.2e12)
    floor_ms = 1e3 * (weight_bytes(model) + unique_kv) / bandwidth
    row = {
        "section": "decode", "case": f"{name} {num_prompts}x{prompt_len} n={n} +{new_tokens}",
        "ours_ms": step_ms, "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / step_ms,
        "tok/s": generated / seconds, "total_s": seconds, "prefill_s": stats.prefill_seconds,
        "prefill_tokens": stats.prefill_tokens, "unique_prompt_tokens": num_prompts * prompt_len,
        "peak_blocks": stats.peak_blocks_in_use, "peak_KV_GB": stats.peak_blocks_in_use * 16 * kv_bytes_per_token(model) / 1e9,
        "pool_blocks": decoder.block_manager.num_blocks, "preemptions": stats.preemptions,
    }
    row["cuda_graphs"] = stats.extra.get("cuda_graphs")
    row["graph_capture_s"] = stats.extra.get("graph_capture_s")
    if DEVICE == "cuda":  # the same padded step without graphs (the debugging switch): what the graphs save
        decoder.runner.graphs.enabled = False
        decoder.generate(prompts, SamplingParams(n=n, temperature=1.0, max_tokens=32, ignore_eos=True, seed=0), use_tqdm=False)
        decoder.runner.graphs.enabled = True
        row["eager_step_ms"] = 1e3 * decoder.stats.decode_seconds / max(decoder.stats.decode_steps, 1)
    if num_prompts * n * prompt_len <= 64 * 1024:  # the gather-everything reference is affordable here
        row["ref_ms"] = reference_attention_step_ms(decoder, prompts, n)
    out_dir = os.environ.get("OUT", ".")
    profile_params = SamplingParams(n=n, temperature=1.0, max_tokens=14, ignore_eos=True, seed=0)
    row["profile_top"] = profile_decode(decoder, prompts, profile_params, os.path.join(out_dir, f"decode_profile_{name}.txt"))
    del decoder, outputs
    gc.collect()
    _sync()
    if time.time() - section_start < HF_BUDGET_S:
        try:
            row.update(transformers_generate(model, prompts[:hf_prompts], n, hf_new_tokens))
            row["speedup_vs_hf"] = row["tok/s"] / row["hf_tok/s"]
        except torch.cuda.OutOfMemoryError as error:  # keep our row; say why the baseline is missing
            row["hf_error"] = f"out of memory: {str(error)[:80]}"
    else:
        row["hf_error"] = f"skipped: section past {HF_BUDGET_S} s"
    del model
    gc.collect()
    _sync()
    return {k: v for k, v in row.items() if v is not None}


def run(args) -> list[dict]:
    rows = []
    section_start = time.time()
    only = [c for c in os.environ.get("GRM_BENCH_DECODE_CASES", "").split(",") if c]  # e.g. qwen2.5-7B
    for name, model_type, shape, *sizes in CASES:
        if only and name not in only:
            continue
        if getattr(args, "quick", False):
            sizes = QUICK[name]
        start = time.time()
        try:
            row = run_case(args, section_start, name, model_type, shape, *sizes)
        except Exception as error:  # one broken case must not hide the others
            traceback.print_exc()
            row = {"section": "decode", "case": name, "error": f"{type(error).__name__}: {str(error)[:120]}"}
            gc.collect()
            _sync()
        rows.append(row)
        print(f"[decode] {name}: {time.time() - start:.1f} s, {row.get('tok/s', 0):.0f} tok/s "
              f"(transformers {row.get('hf_tok/s', 0):.0f}), step {row.get('ours_ms', 0):.2f} ms "
              f"vs floor {row.get('floor_ms', 0):.2f}", flush=True)
    return rows
