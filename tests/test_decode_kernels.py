"""Triton paged-attention kernels against the reference path (under TRITON_INTERPRET=1 on CPU, tiny shapes)."""
import pytest
import torch

from grm_engine.decode.attention import decode_attention_reference, store_kv_reference
from grm_engine.kernels.paged_attention import paged_decode_attention, store_kv_triton


def random_pages(batch, kv_heads, head_dim, block_size, context_lens, dtype=torch.float32, device="cpu", seed=0):
    """Caches filled with noise, and for each sequence a shuffled block table over distinct pages."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(blocks_per_seq) + 1
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    return k_cache, v_cache, tables.to(device), torch.tensor(context_lens, dtype=torch.int32, device=device)


def test_store_kv_matches_reference():
    torch.manual_seed(0)
    k = torch.randn(7, 2, 16)
    v = torch.randn(7, 2, 16)
    slots = torch.tensor([3, 9, 0, 17, 4, 30, 31])
    ours = [torch.full((8, 4, 2, 16), float("nan")) for _ in range(2)]  # poisoned: untouched slots stay NaN
    ref = [t.clone() for t in ours]
    store_kv_triton(k, v, ours[0], ours[1], slots)
    store_kv_reference(k, v, ref[0], ref[1], slots)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("num_heads,kv_heads,head_dim,block_size,lens,window,softcap,num_splits", [
    (4, 2, 16, 4, [1, 7, 33], None, None, 1),
    (4, 1, 32, 8, [5, 70, 41], None, None, 3),  # split-K with uneven and empty splits
    (2, 2, 16, 4, [30, 12], 8, 2.0, 2),  # sliding window + soft-capping (Gemma 2)
    (6, 2, 24, 16, [19, 50], None, None, 2),  # head_dim not a power of two, group of 3
    (4, 2, 16, 4, [3, 100, 17], 12, None, 8),  # more splits than a short sequence has tiles: empty splits
])
def test_paged_decode_matches_reference(num_heads, kv_heads, head_dim, block_size, lens, window, softcap, num_splits):
    k_cache, v_cache, tables, context_lens = random_pages(len(lens), kv_heads, head_dim, block_size, lens)
    q = torch.randn(len(lens), num_heads, head_dim)
    scale = head_dim ** -0.5
    ours = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, window=window, softcap=softcap,
                                  num_splits=num_splits, block_n=16)
    ref = decode_attention_reference(q, k_cache, v_cache, tables, context_lens, scale, window, softcap)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_decoder_end_to_end_with_triton_kernels(monkeypatch):
    """The whole decoder on the Triton path (interpreted) gives the reference path's greedy tokens."""
    from grm_engine.decode import Decoder, SamplingParams
    from test_decode_models import tiny_model

    model = tiny_model("gemma2", seed=7)
    prompts = [list(range(5, 30)), [11, 12, 13]]
    params = SamplingParams(n=2, temperature=0.9, max_tokens=12, seed=1, ignore_eos=True)
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "reference")
    ref = Decoder.from_pretrained(model, num_kv_blocks=64, block_size=4).generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    ours = Decoder.from_pretrained(model, num_kv_blocks=64, block_size=4).generate(prompts, params, use_tqdm=False)
    assert [[s.token_ids for s in r.outputs] for r in ours] == [[s.token_ids for s in r.outputs] for r in ref]


def _bf16_error_bound(q, k_cache, v_cache, tables, context_lens, scale, window, softcap):
    exact = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), tables, context_lens, scale, window, softcap)
    low = decode_attention_reference(q, k_cache, v_cache, tables, context_lens, scale, window, softcap)
    return exact, (low.double() - exact).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("lens,window,softcap", [([4096, 17, 2048, 9000], None, None), ([8192, 100], 4096, 50.0)])
def test_paged_decode_long_context_gpu(lens, window, softcap):
    num_heads, kv_heads, head_dim, block_size = 28, 4, 128, 16
    k_cache, v_cache, tables, context_lens = random_pages(len(lens), kv_heads, head_dim, block_size, lens,
                                                          dtype=torch.bfloat16, device="cuda")
    q = torch.randn(len(lens), num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    ours = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, window=window, softcap=softcap)
    exact, reference_error = _bf16_error_bound(q, k_cache, v_cache, tables, context_lens, scale, window, softcap)
    assert (ours.double() - exact).abs().max().item() <= 2 * reference_error + 1e-3


@pytest.mark.gpu
def test_store_kv_gpu():
    k = torch.randn(300, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(300, 4, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    ours = [torch.full((64, 16, 4, 128), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    ref = [t.clone() for t in ours]
    store_kv_triton(k, v, ours[0], ours[1], slots)
    store_kv_reference(k, v, ref[0], ref[1], slots)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
