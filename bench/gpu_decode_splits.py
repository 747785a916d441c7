"""Tuning the plain paged decode kernel's split-K launch (kernels/paged_attention.py: SPLIT_WAVES,
SPLIT_MIN_TOKENS, DECODE_BLOCK_N) at the decoder's real step shapes, then the decoder end to end with the
default and the best setting, in the same run.

Kernel shapes: the Qwen2.5-0.5B step of the decode benchmark (32 samples of a 1,024-token prompt: 14 query heads,
2 KV heads, D = 64) and the Gemma 2 2B step (2 prompts x 32 samples: 8 / 4 heads, D = 256); the samples share
their prompt's pages (as forks do), each has 64-256 private tokens.

    python bench/gpu.py --only decode_splits
"""
from __future__ import annotations

import itertools
import time

import torch
from triton.testing import do_bench_cudagraph

from grm_engine.kernels import paged_attention as pa

SHAPES = {  # name: (prompts, samples per prompt, prompt tokens, query heads, kv heads, head_dim, decode case)
    "qwen2.5-0.5B": (1, 32, 1024, 14, 2, 64, "qwen2.5-0.5B"),
    "gemma2-2B": (2, 32, 1024, 8, 4, 256, "gemma2-2B"),
}
CONFIGS = list(itertools.product((2, 4, 8), (256, 128), (None, 32, 64, 128)))  # waves, min tokens, block_n (None: default)
BLOCK_SIZE = 16


def shared_prefix_pages(prompts, samples, prompt_len, kv_heads, head_dim, device="cuda"):
    """Block tables where each prompt's samples share its pages, plus 64-256 private tokens each."""
    g = torch.Generator().manual_seed(0)
    prompt_blocks = prompt_len // BLOCK_SIZE
    tables, lens, next_block = [], [], 0
    for _ in range(prompts):
        shared = list(range(next_block, next_block + prompt_blocks))
        next_block += prompt_blocks
        for _ in range(samples):
            extra = int(torch.randint(64, 257, (1,), generator=g))
            own = -(-extra // BLOCK_SIZE)
            tables.append(shared + list(range(next_block, next_block + own)))
            next_block += own
            lens.append(prompt_len + extra)
    width = max(map(len, tables))
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    cache = lambda: torch.randn(next_block, BLOCK_SIZE, kv_heads, head_dim, device=device, dtype=torch.bfloat16)  # noqa: E731
    return cache(), cache(), table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def set_config(waves, min_tokens, block_n):
    pa.SPLIT_WAVES, pa.SPLIT_MIN_TOKENS, pa.DECODE_BLOCK_N = waves, min_tokens, block_n


def kernel_rows(name, shape) -> tuple[list[dict], tuple]:
    prompts, samples, prompt_len, heads, kv_heads, head_dim, _ = shape
    k_cache, v_cache, tables, lens = shared_prefix_pages(prompts, samples, prompt_len, kv_heads, head_dim)
    batch = tables.shape[0]
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    width = 1 << (tables.shape[1] - 1).bit_length()  # as the decoder's graph shapes
    rows, default = [], (pa.SPLIT_WAVES, pa.SPLIT_MIN_TOKENS, pa.DECODE_BLOCK_N)
    for config in CONFIGS:
        set_config(*config)
        splits = pa.choose_num_splits(batch, kv_heads, width * BLOCK_SIZE, q.device)
        # replayed from a CUDA graph, as in the decoder (eager timing of these 5-30 us kernels is launch overhead)
        ms = do_bench_cudagraph(lambda: pa.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5,
                                                                  num_splits=splits), rep=100, return_mode="median")
        rows.append({"section": "decode_splits", "case": f"{name} kernel waves={config[0]} min={config[1]} "
                     f"block_n={config[2]}", "ours_ms": ms, "splits": splits,
                     "default": config == default})
    set_config(*default)
    best = min(rows, key=lambda r: r["ours_ms"])
    best_config = CONFIGS[rows.index(best)]
    default_ms = next(r["ours_ms"] for r in rows if r["default"])
    for r in rows:
        r["vs_default"] = default_ms / r["ours_ms"]
    return rows, best_config


def decode_row(name, case, config) -> dict:
    """The decode benchmark's case, end to end (no profile, no baselines), under one split setting."""
    import gpu_decode
    from grm_engine.decode import Decoder, SamplingParams

    _, model_type, shape, num_prompts, prompt_len, n, new_tokens, *_ = next(c for c in gpu_decode.CASES if c[0] == case)
    set_config(*config)
    model = gpu_decode.build_model(model_type, shape)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, shape["vocab_size"], (prompt_len,), generator=g).tolist() for _ in range(num_prompts)]
    decoder = Decoder.from_pretrained(model, kv_cache_memory_fraction=0.5, max_num_seqs=256, block_size=BLOCK_SIZE)
    decoder.generate(prompts, SamplingParams(n=n, max_tokens=4, ignore_eos=True, seed=1), use_tqdm=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    decoder.generate(prompts, SamplingParams(n=n, max_tokens=new_tokens, ignore_eos=True, seed=0), use_tqdm=False)
    seconds = time.perf_counter() - start
    stats = decoder.stats
    del decoder, model
    torch.cuda.empty_cache()
    return {"section": "decode_splits", "case": f"{name} decode waves={config[0]} min={config[1]} block_n={config[2]}",
            "ours_ms": 1e3 * stats.decode_seconds / max(stats.decode_steps, 1), "tok/s": stats.generated_tokens / seconds,
            "total_s": seconds, "prefill_s": stats.prefill_seconds}


def run(args) -> list[dict]:
    rows = []
    default = (pa.SPLIT_WAVES, pa.SPLIT_MIN_TOKENS, pa.DECODE_BLOCK_N)
    for name, shape in SHAPES.items():
        kernel, best = kernel_rows(name, shape)
        rows += kernel
        for config in dict.fromkeys([default, best]):  # the default first, then the best (if it differs)
            rows.append(decode_row(name, shape[-1], config))
        set_config(*default)
    return rows
