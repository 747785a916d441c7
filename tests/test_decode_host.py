"""The decoder's host-overhead fast paths equal their references: int32 sampling noise vs the int64
specification (bit for bit), the sampler with either noise, and the vectorized step inputs."""
import pytest
import torch

from grm_engine.decode.sampler import sample, uniform_noise, uniform_noise_reference


def random_keys(batch: int, seed: int) -> torch.Tensor:
    """[batch, 4] int64 noise keys over the full ranges (64-bit seed, 32-bit columns), edge rows included."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.stack([torch.randint(0, 2**63 - 1, (batch,), generator=g)]
                       + [torch.randint(0, 2**32, (batch,), generator=g) for _ in range(3)], 1)
    keys[0] = torch.tensor([2**63 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1])
    keys[1] = 0
    keys[2] = torch.tensor([2**31, 2**31, 2**31 - 1, 2**31])
    return keys


@pytest.mark.parametrize("vocab_size", [1, 5, 1000, 4099, 152064])
def test_int32_noise_equals_the_int64_reference_bit_for_bit(vocab_size):
    keys = random_keys(48 if vocab_size < 100_000 else 8, seed=vocab_size)
    fast, ref = uniform_noise(keys, vocab_size), uniform_noise_reference(keys, vocab_size)
    assert fast.dtype == ref.dtype == torch.float32 and fast.shape == ref.shape == (len(keys), vocab_size)
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))
    # the cached token half is reused across calls (other keys, same vocab) and stays right
    keys2 = random_keys(8, seed=vocab_size + 1)
    assert torch.equal(uniform_noise(keys2, vocab_size), uniform_noise_reference(keys2, vocab_size))


def test_sampler_draws_the_same_tokens_with_either_noise():
    g = torch.Generator().manual_seed(3)
    batch, vocab = 40, 3000
    logits = torch.randn(batch, vocab, generator=g) * 3
    temperature = torch.rand(batch, generator=g) * 1.5
    temperature[::5] = 0  # greedy rows among sampled ones
    top_k = torch.randint(0, 50, (batch,), generator=g) * (torch.rand(batch, generator=g) < 0.5)
    top_p = torch.where(torch.rand(batch, generator=g) < 0.5, torch.rand(batch, generator=g) * 0.9 + 0.1, torch.ones(batch))
    keys = random_keys(batch, seed=11)
    for args in [(temperature, top_k, top_p), (temperature.clamp_min(0.3), torch.zeros_like(top_k), torch.ones_like(top_p))]:
        ref_tokens, ref_logp = sample(logits, *args, keys, True, noise=uniform_noise_reference)
        for hints in [{}, {"all_greedy": False, "any_greedy": bool((args[0] <= 0).any()),
                           "any_filter": bool(((args[1] > 0) | (args[2] < 1)).any())}]:
            tokens, logp = sample(logits, *args, keys, True, **hints)
            assert torch.equal(tokens, ref_tokens) and torch.equal(logp, ref_logp), hints


@pytest.mark.gpu
def test_int32_noise_equals_the_reference_on_gpu():
    keys = random_keys(64, seed=5).cuda()
    assert torch.equal(uniform_noise(keys, 152064), uniform_noise_reference(keys, 152064))
    assert torch.equal(uniform_noise(keys, 152064).cpu(), uniform_noise_reference(keys.cpu(), 152064))
