"""Varlen paged prefill attention (Triton; TRITON_INTERPRET=1 on CPU, small fp32 shapes) against the per-sequence
reference (grm_engine.decode.attention.prefill_attention_reference): several sequences per step, chunks and prefix
hits that start mid-block, GQA, sliding window, soft-capping; the decoder's greedy tokens with either prefill path;
bf16 error bounds at the 7B shape on the GPU; the kernel compiles for sm_90 here (no GPU needed)."""
import random

import pytest
import torch

from grm_engine.decode import attention
from grm_engine.decode.attention import AttentionMetadata, prefill_attention_reference, store_kv_reference
from grm_engine.kernels.varlen_attention import TILE_CONFIGS, TileConfig, varlen_prefill_attention


def prefill_step(spans, num_heads, kv_heads, head_dim, block_size, dtype=torch.float32, device="cpu", seed=0):
    """spans: [(num_cached, num_new)] per sequence. Pages hold noise for the cached tokens (and everywhere else),
    each sequence's block table is a shuffled set of distinct pages, and the step's new K/V are stored into them as
    the decoder does before attention. q, k, v are column views of one [T, (H + 2 kv_heads) * D] projection output,
    as the merged q/k/v GEMM gives them. Returns q, k, v, k_cache, v_cache, meta."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-(cached + new) // block_size) for cached, new in spans]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks) + 1  # padded with 0 past each sequence's blocks, as the decoder does
    tables = torch.zeros(len(spans), width, dtype=torch.int32)
    slots, query_starts = [], [0]
    for b, ((cached, new), n) in enumerate(zip(spans, blocks)):
        tables[b, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
        slots += [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(cached, cached + new)]
        query_starts.append(query_starts[-1] + new)
    tokens = query_starts[-1]
    qkv = torch.randn(tokens, (num_heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype)
    q, k, v = qkv.split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, num_heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    context_lens = [cached + new for cached, new in spans]
    meta = AttentionMetadata(is_prefill=True, slot_mapping=slot_mapping, block_tables=tables.to(device),
                             context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
                             query_starts=query_starts, num_cached=[cached for cached, _ in spans],
                             max_context_len=max(context_lens))
    return q, k, v, k_cache, v_cache, meta


def ours(q, k, v, k_cache, v_cache, meta, scale, window=None, softcap=None, config=None, packed=None):
    device = q.device
    return varlen_prefill_attention(
        q, k, v, k_cache, v_cache, meta.block_tables, torch.tensor(meta.query_starts, dtype=torch.int32, device=device),
        torch.tensor(meta.num_cached, dtype=torch.int32, device=device), scale,
        max_query_len=attention.longest_query(meta.query_starts), window=window, softcap=softcap,
        any_cached=any(meta.num_cached), config=config, packed_when_uncached=packed)


def random_spans(rng: random.Random, num_seqs: int, max_cached: int, max_new: int):
    """Fresh prompts, chunks after a cached part, prefix hits; 1-token chunks; cached parts ending mid-block."""
    return [(rng.choice([0, rng.randint(1, max_cached)]), rng.choice([1, rng.randint(1, max_new)])) for _ in range(num_seqs)]


SMALL = TileConfig(16, 16, 4, 1)  # many row and key tiles at these lengths: every masked/unmasked split is hit
CASES = [  # num_heads, kv_heads, head_dim, block_size, spans (or a seed), window, softcap
    (2, 2, 64, 4, [(0, 37), (5, 20), (0, 1), (13, 1)], None, None),  # GQA group 1; a 1-token chunk mid-block
    (4, 2, 64, 8, 1, None, None),  # group 2, random spans
    (8, 2, 128, 4, [(0, 21), (22, 11), (3, 30)], None, None),  # group 4: a row tile spans 4 tokens
    (7, 1, 32, 16, [(17, 9), (0, 26)], None, None),  # Qwen2.5-7B's group of 7: row tiles cut tokens' heads apart
    (4, 2, 32, 4, [(0, 40), (31, 15), (6, 2)], 9, None),  # sliding window (head and tail tiles masked)
    (2, 1, 16, 4, [(0, 33), (10, 25)], 7, 1.5),  # Gemma 2: window + soft-capping
    (2, 1, 32, 4, [(0, 64), (40, 30)], 40, None),  # a window wider than a tile: masked, unmasked, masked key tiles
    (4, 4, 64, 8, 2, None, 2.0),  # soft-capping alone, random spans
]


@pytest.mark.parametrize("num_heads,kv_heads,head_dim,block_size,spans,window,softcap", CASES)
def test_varlen_matches_reference(num_heads, kv_heads, head_dim, block_size, spans, window, softcap):
    if isinstance(spans, int):
        spans = random_spans(random.Random(spans), 4, 30, 25)
    q, k, v, k_cache, v_cache, meta = prefill_step(spans, num_heads, kv_heads, head_dim, block_size, seed=len(spans))
    scale = head_dim ** -0.5
    reference = prefill_attention_reference(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    for config in (SMALL, TileConfig(32, 16, 4, 1)):
        torch.testing.assert_close(ours(q, k, v, k_cache, v_cache, meta, scale, window, softcap, config), reference,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,softcap", [(None, None), (6, 3.0)])
def test_fresh_prompts_packed_keys_equal_paged(window, softcap):
    """With nothing cached the kernel may read k, v directly instead of the pages: both equal the reference."""
    spans = [(0, 29), (0, 3), (0, 18)]
    q, k, v, k_cache, v_cache, meta = prefill_step(spans, 4, 2, 32, 4)
    reference = prefill_attention_reference(q, k, v, k_cache, v_cache, meta, 0.2, window, softcap)
    for packed in (True, False):
        out = ours(q, k, v, k_cache, v_cache, meta, 0.2, window, softcap, SMALL, packed=packed)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_head_dim_256_and_peaked_scores():
    """Gemma 2's head_dim, and scores spread over hundreds (a near one-hot softmax): finite, and no further from
    the fp64 result than twice the fp32 reference's own error (fp32 scores of that size carry ~1e-5 rounding)."""
    q, k, v, k_cache, v_cache, meta = prefill_step([(9, 14), (0, 20)], 2, 1, 256, 8)
    for scale in (256 ** -0.5, 3.0):
        exact = prefill_attention_reference(q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(),
                                            meta, scale, 11)
        reference_error = (prefill_attention_reference(q, k, v, k_cache, v_cache, meta, scale, 11).double() - exact).abs().max()
        out = ours(q, k, v, k_cache, v_cache, meta, scale, 11, config=TileConfig(16, 16, 4, 1))
        assert torch.isfinite(out).all()
        assert (out.double() - exact).abs().max() <= 2 * reference_error + 1e-6


def test_dispatcher_uses_the_kernel(monkeypatch):
    """prefill_attention on the Triton backend runs the kernel (the metadata's lists are enough)."""
    q, k, v, k_cache, v_cache, meta = prefill_step([(3, 10), (0, 7)], 4, 2, 16, 4)
    reference = prefill_attention_reference(q, k, v, k_cache, v_cache, meta, 0.25)
    calls = []
    real = varlen_prefill_attention
    monkeypatch.setattr("grm_engine.kernels.varlen_attention.varlen_prefill_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    torch.testing.assert_close(attention.prefill_attention(q, k, v, k_cache, v_cache, meta, 0.25), reference,
                               atol=1e-5, rtol=1e-5)
    assert calls == [1]


def test_bad_inputs_are_named():
    q, k, v, k_cache, v_cache, meta = prefill_step([(0, 5)], 4, 2, 16, 4)
    starts, cached = torch.tensor([0, 5]), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        varlen_prefill_attention(q, k, v, k_cache, v_cache, meta.block_tables, starts, cached, 0.25, max_query_len=5)
    with pytest.raises(ValueError, match="KV heads"):
        varlen_prefill_attention(q[:, :3], k, v, k_cache, v_cache, meta.block_tables, starts.int(), cached, 0.25,
                                 max_query_len=5)


def kernel_prefill(q, k, v, k_cache, v_cache, meta, scale, window=None, softcap=None):
    """The varlen kernel fed with the step metadata's own device tensors (as model_runner.prepare builds them)."""
    assert meta.query_starts_device.tolist() == meta.query_starts and meta.num_cached_device.tolist() == meta.num_cached
    return varlen_prefill_attention(q, k, v, k_cache, v_cache, meta.block_tables, meta.query_starts_device,
                                    meta.num_cached_device, scale, max_query_len=meta.max_query_len, window=window,
                                    softcap=softcap, any_cached=any(meta.num_cached), config=SMALL)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_decoder_prefill_kernel_gives_the_reference_tokens(monkeypatch, family):
    """The decoder with the varlen prefill kernel vs with the reference prefill loop (everything else on the
    reference path, so only prefill attention differs; the interpreter is slow): equal greedy tokens and log-probs,
    through chunked prefill (chunks end mid-block), prefixes shared within a step and a second call that hits the
    prefix cache mid-prompt. Gemma 2: sliding-window and soft-capped layers."""
    from grm_engine.decode import Decoder, SamplingParams
    from grm_engine.decode.models import llama
    from test_decode_models import make_prompts, tiny_model

    model = tiny_model(family, seed=3)
    prompts = make_prompts(seed=5)[1:4]  # 30, 47, 24 tokens; the first and last share 21
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=True)
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "reference")
    results = []
    for prefill in (prefill_attention_reference, kernel_prefill):
        monkeypatch.setattr(llama, "prefill_attention", prefill)
        decoder = Decoder.from_pretrained(model, num_kv_blocks=64, block_size=4, max_num_batched_tokens=23)
        outputs = decoder.generate(prompts + [p + [9, 10, 11] for p in prompts], params, use_tqdm=False)
        assert decoder.stats.prefix_cache_hit_tokens >= 60  # the longer prompts start after the cached blocks
        results.append([s for r in outputs for s in r.outputs])
    reference, kernel = results
    assert [s.token_ids for s in kernel] == [s.token_ids for s in reference]
    torch.testing.assert_close(torch.tensor([s.logprobs for s in kernel]), torch.tensor([s.logprobs for s in reference]),
                               atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ GPU lane
def _bf16_errors(q, k, v, k_cache, v_cache, meta, scale, window=None, softcap=None):
    """(fp64 result, max |error| of the PyTorch reference run in bf16)."""
    exact = prefill_attention_reference(q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), meta,
                                        scale, window, softcap)
    low = prefill_attention_reference(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    return exact, (low.double() - exact).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("spans", [[(0, 2048)] * 8, [(1536, 512)] * 4 + [(0, 2048), (700, 1348), (1, 2047), (2040, 8)]],
                         ids=["8x2048 fresh", "prefix hits and chunks"])
def test_varlen_7b_shape_bf16_gpu(spans):
    q, k, v, k_cache, v_cache, meta = prefill_step(spans, 28, 4, 128, 16, dtype=torch.bfloat16, device="cuda")
    scale = 128 ** -0.5
    exact, reference_error = _bf16_errors(q, k, v, k_cache, v_cache, meta, scale)
    for packed in (True, False):
        out = ours(q, k, v, k_cache, v_cache, meta, scale, packed=packed)
        assert (out.double() - exact).abs().max().item() <= 2 * reference_error + 1e-3


@pytest.mark.gpu
def test_varlen_gemma2_shape_bf16_gpu():
    spans = [(0, 1024), (300, 724), (4000, 200)]
    q, k, v, k_cache, v_cache, meta = prefill_step(spans, 8, 4, 256, 16, dtype=torch.bfloat16, device="cuda")
    exact, reference_error = _bf16_errors(q, k, v, k_cache, v_cache, meta, 256 ** -0.5, 4096, 50.0)
    out = ours(q, k, v, k_cache, v_cache, meta, 256 ** -0.5, 4096, 50.0)
    assert (out.double() - exact).abs().max().item() <= 2 * reference_error + 1e-3


# ------------------------------------------------------------------------- compiles for sm_90 (the H200), here
COMPILE_CASES = [  # the decoder's launches at real shapes, with the default tiles
    dict(GROUP=7, HEAD_DIM=128, PAGED=True, USE_SOFTCAP=False, USE_WINDOW=False),  # Qwen2.5-7B, prefix hit / chunk
    dict(GROUP=7, HEAD_DIM=64, PAGED=False, USE_SOFTCAP=False, USE_WINDOW=False),  # Qwen2.5-0.5B, fresh prompts
    dict(GROUP=2, HEAD_DIM=256, PAGED=True, USE_SOFTCAP=True, USE_WINDOW=True),  # Gemma 2 2B
]


def compile_all():
    """Frontend, PTX and ptxas for sm_90, launching nothing. Pointers and strides are declared divisible by 16, as
    Triton specializes them at launch (the block-table stride is left unspecialized: it is the table's width)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from grm_engine.kernels.varlen_attention import _varlen_prefill_kernel as fn

    int_pointers = {"block_tables_ptr", "query_starts_ptr", "num_cached_ptr"}
    for case in COMPILE_CASES:
        config = TILE_CONFIGS[case["HEAD_DIM"]]
        constexprs = dict(case, BLOCK_SIZE=16, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                          BLOCK_D=case["HEAD_DIM"], DOT_PRECISION="tf32")
        signature = {name: "constexpr" if name in constexprs else
                     ("*i32" if name in int_pointers else "*bf16") if name.endswith("_ptr") else
                     "fp32" if name in ("qk_scale", "softcap") else "i32" for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name.endswith("_ptr") or (name.startswith("stride") and name != "stride_bt")}
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        assert compiled.asm.get("cubin"), case
        print("compiled", case, config, flush=True)


def test_varlen_kernel_compiles_for_sm90():
    from triton_compile import run_compile_script

    run_compile_script(__file__, expected=len(COMPILE_CASES), timeout=600)


if __name__ == "__main__":
    compile_all()
