"""The decoder's fused Triton kernels (RMSNorm with the residual add, rotary + KV store, gated activation)
against the PyTorch ops they replace (CPU: TRITON_INTERPRET=1; GPU: bf16 at real widths)."""
import pytest
import torch
import torch.nn.functional as F

from grm_engine.decode.attention import store_kv_reference
from grm_engine.decode.models.layers import RotaryEmbedding, gemma_rms_norm, rms_norm
from grm_engine.kernels.gated_act import gated_act_triton
from grm_engine.kernels.rms_norm import rms_norm_triton
from grm_engine.kernels.rotary_store import rotary_store_triton

# bf16 on the GPU only: the Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest
CASES = [("cpu", torch.float32), pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
         pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]


def tolerance(dtype):
    # one rounding of the model dtype apart at most (the fp32 sum of squares may be ordered differently)
    return dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_and_add(device, dtype, gemma):
    hidden = 896 if device == "cuda" else 40  # not a power of two: masked columns
    x = torch.randn(7, hidden, device=device).to(dtype)
    delta = torch.randn(7, hidden, device=device).to(dtype)
    weight = (1 + 0.3 * torch.randn(hidden, device=device)).to(dtype)
    reference = gemma_rms_norm if gemma else rms_norm
    out = rms_norm_triton(x, weight, 1e-6, gemma=gemma)
    torch.testing.assert_close(out, reference(x, weight, 1e-6), **(tolerance(dtype) if dtype != torch.float32 else dict(atol=1e-6, rtol=1e-6)))
    normed, summed = rms_norm_triton(x, weight, 1e-6, delta=delta, gemma=gemma)
    torch.testing.assert_close(summed, x + delta, atol=0, rtol=0)  # the add is PyTorch's, bit for bit
    torch.testing.assert_close(normed, reference(x + delta, weight, 1e-6), **(tolerance(dtype) if dtype != torch.float32 else dict(atol=1e-6, rtol=1e-6)))
    if dtype == torch.bfloat16:  # disagreements are single roundings at rare ties
        assert (normed != reference(x + delta, weight, 1e-6)).float().mean() < 0.01


class _Config:
    model_type, rope_parameters = "llama", {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize("device,dtype", CASES)
def test_rotary_store_equals_rotate_then_store(device, dtype):
    tokens, heads, kv_heads, head_dim, blocks, block_size = 5, 6, 2, 32, 6, 4
    rotary = RotaryEmbedding(_Config(), head_dim, 64, device, dtype)
    cos, sin = rotary.tables(torch.tensor([0, 3, 17, 40, 63], device=device))
    q = torch.randn(tokens, heads, head_dim, device=device).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, device=device).to(dtype)
    slots = torch.tensor([3, -1, 9, 22, 0], device=device)  # -1: a padding row, nothing stored
    caches = [torch.full((blocks, block_size, kv_heads, head_dim), 7.0, device=device, dtype=dtype) for _ in range(4)]
    ref_q, ref_k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
    keep = slots >= 0
    store_kv_reference(ref_k[keep], v[keep], caches[2], caches[3], slots[keep])
    rotary_store_triton(q, k, v, cos, sin, caches[0], caches[1], slots)
    # CPU (interpreter): bit for bit. GPU: the compiler keeps some products in fp32 (a fused multiply-add, one
    # rounding fewer), so within one rounding of the operands (|x|, |cos| <= ~4 here), measured on the H200
    exact = dict(atol=0, rtol=0) if device == "cpu" else dict(atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)
    for ours, ref in ((q, ref_q), (k, ref_k), (caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(ours, ref, **exact)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_act(device, dtype, activation):
    width = 4864 if device == "cuda" else 300
    gate = (3 * torch.randn(5, width, device=device)).to(dtype)
    up = torch.randn(5, width, device=device).to(dtype)
    act = F.silu if activation == "silu" else (lambda x: F.gelu(x, approximate="tanh"))
    ours, ref = gated_act_triton(gate, up, activation), act(gate) * up
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(ours, ref, **tolerance(dtype))
        assert (ours != ref).float().mean() < 0.01


@pytest.mark.parametrize("device,vocab", [("cpu", 3000), pytest.param("cuda", 152064, marks=pytest.mark.gpu)])
def test_fused_gumbel_draw_equals_the_unfused_sampler(device, vocab, monkeypatch):
    """sample() without filters draws through gumbel_argmax_triton on the Triton path; the unfused path (noise
    tensor, in-place transforms, argmax) is the reference. Greedy rows and log-probs ride along unchanged."""
    import numpy as np

    from grm_engine.decode.sampler import row_hash_numpy, sample

    g = torch.Generator().manual_seed(0)
    batch = 64 if device == "cuda" else 8
    logits = (torch.randn(batch, vocab, generator=g) * 4).to(device)
    logits[1, 7] = 1e4  # a dominant token
    logits[2, :vocab // 2] = float("-inf")  # banned tokens
    temperature = torch.rand(batch, generator=g).add(0.3).to(device)
    temperature[3] = 0.0  # a greedy row in a sampled batch
    keys = np.stack([np.full(batch, 9), np.arange(batch), np.arange(batch) % 3, 100 + np.arange(batch)], 1)
    row_hash = torch.from_numpy(row_hash_numpy(keys)).to(device)
    no_filter = (torch.zeros(batch, dtype=torch.long, device=device), torch.ones(batch, device=device))
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    fused = sample(logits, temperature, *no_filter, row_hash, want_logprobs=True)
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "reference")
    unfused = sample(logits, temperature, *no_filter, row_hash, want_logprobs=True)
    assert torch.equal(fused[0], unfused[0])
    torch.testing.assert_close(fused[1], unfused[1], atol=0, rtol=0)
    assert fused[0][1] == 7 and fused[0][2] >= vocab // 2 and fused[0][3] == logits[3].argmax()


def test_gumbel_argmax_chunks_keep_the_first_maximum():
    """Several chunks per row (a partial last one); a tie across chunks goes to the lower token id."""
    from grm_engine.decode.noise_triton import gumbel_argmax_triton
    from grm_engine.decode.sampler import uniform_noise_reference

    from grm_engine.decode.sampler import row_keys, to_int32_bits

    keys = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    row_hash = to_int32_bits(row_keys(keys))
    logits = torch.randn(3, 1000) * 2
    temperature = torch.tensor([1.0, 0.5, 2.0])
    gumbel = -torch.log(-torch.log(uniform_noise_reference(keys, 1000)))
    expected = torch.argmax(gumbel + logits / temperature[:, None], dim=-1)
    assert torch.equal(gumbel_argmax_triton(logits, temperature, row_hash, block=128), expected)
    logits[2] = float("-inf")
    logits[2, [700, 3]] = 1e30  # 1e30 / 2 + gumbel rounds to 5e29 in both chunks: a tie -> the first token
    assert gumbel_argmax_triton(logits, temperature, row_hash, block=128)[2] == 3
