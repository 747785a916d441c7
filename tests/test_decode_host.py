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
@pytest.mark.parametrize("backend", ["triton", "reference"])  # the fused kernel, the torch int32 ops
def test_fast_noise_equals_the_reference_on_gpu(backend, monkeypatch):
    monkeypatch.setenv("GRM_ENGINE_BACKEND", backend)
    keys = random_keys(64, seed=5).cuda()
    assert torch.equal(uniform_noise(keys, 152064), uniform_noise_reference(keys, 152064))
    assert torch.equal(uniform_noise(keys, 152064).cpu(), uniform_noise_reference(keys.cpu(), 152064))


def test_host_row_hash_equals_the_device_row_keys():
    from grm_engine.decode.sampler import row_hash_numpy, row_keys, to_int32_bits

    keys = random_keys(64, seed=2)
    assert torch.equal(torch.from_numpy(row_hash_numpy(keys.numpy())), to_int32_bits(row_keys(keys)))
    assert torch.equal(uniform_noise(torch.from_numpy(row_hash_numpy(keys.numpy())), 777), uniform_noise_reference(keys, 777))


def test_vectorized_decode_inputs_equal_the_reference_prepare():
    """Every decode step of a run with forks, copy-on-write and preemption: prepare_decode == prepare."""
    from grm_engine.decode import Decoder, SamplingParams
    from test_decode_models import tiny_model

    decoder = Decoder.from_pretrained(tiny_model("qwen2"), num_kv_blocks=40, block_size=4)
    runner, checked = decoder.runner, []
    fast = runner.prepare_decode

    def checking(batch, extra=()):
        ids, pos, meta, extra_t = fast(batch, extra)
        ref_ids, ref_pos, ref_meta = runner.prepare(batch)
        assert torch.equal(ids, ref_ids) and torch.equal(pos, ref_pos)
        for name in ("slot_mapping", "block_tables", "context_lens"):
            assert torch.equal(getattr(meta, name), getattr(ref_meta, name)), name
        assert (meta.query_starts, meta.num_cached, meta.max_context_len, meta.is_prefill) == (
            ref_meta.query_starts, ref_meta.num_cached, ref_meta.max_context_len, ref_meta.is_prefill)
        assert [torch.equal(t, torch.from_numpy(a)) for t, a in zip(extra_t, extra)] == [True] * len(extra)
        checked.append(len(batch.seqs))
        return ids, pos, meta, extra_t

    runner.prepare_decode = checking
    prompts = [[5 + i for i in range(n)] for n in (3, 9, 14)]
    decoder.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=20, ignore_eos=True, seed=4), use_tqdm=False)
    assert decoder.stats.preemptions > 0 and len(checked) == decoder.stats.decode_steps and max(checked) == 9


def test_packed_upload_round_trips_every_dtype_and_shape():
    import numpy as np

    from grm_engine.decode.model_runner import upload_packed

    rng = np.random.default_rng(0)
    arrays = [rng.integers(-2**40, 2**40, 5), rng.integers(-9, 9, (3, 7)).astype(np.int32), rng.random(3).astype(np.float32),
              np.zeros((0,), np.int64), rng.integers(0, 5, 1).astype(np.int32), rng.integers(0, 5, (2, 2))]
    out = upload_packed(arrays, torch.device("cpu"), pin=False)
    assert len(out) == len(arrays)
    for t, a in zip(out, arrays):
        assert t.shape == a.shape and t.numpy().dtype == a.dtype and np.array_equal(t.numpy(), a)


@pytest.mark.gpu
def test_packed_upload_on_gpu():
    import numpy as np

    from grm_engine.decode.model_runner import upload_packed

    arrays = [np.arange(5, dtype=np.int64), np.arange(21, dtype=np.int32).reshape(3, 7), np.linspace(0, 1, 3, dtype=np.float32)]
    for t, a in zip(upload_packed(arrays, torch.device("cuda"), pin=True), arrays):
        assert t.is_cuda and np.array_equal(t.cpu().numpy(), a)


def test_noise_never_reaches_one():
    """u = 1.0 would give +inf Gumbel noise (a uniformly random token, filters ignored); the top 24-bit value
    is capped below 1. Keys chosen so that the old formula produced exactly 1.0 somewhere."""
    keys = torch.stack([torch.full((64,), 5), torch.zeros(64, dtype=torch.long), torch.arange(64), torch.full((64,), 100)], 1)
    from grm_engine.decode.sampler import row_keys, mix32

    bits = mix32(row_keys(keys)[:, None] ^ mix32(torch.arange(152064) ^ 0x082EFA98)[None, :])
    assert ((bits >> 8) == 0xFFFFFF).any()  # the edge case is exercised
    for noise in (uniform_noise, uniform_noise_reference):
        u = noise(keys, 152064)
        assert u.max() < 1 and u.min() > 0 and torch.isfinite(-torch.log(-torch.log(u))).all()
    # a token the top-k filter removed is never drawn
    logits = torch.zeros(64, 152064)
    tokens, _ = sample(logits, torch.ones(64), torch.full((64,), 1), torch.ones(64), keys)
    assert (tokens == 0).all()


def test_triton_noise_kernel_equals_the_reference():
    """Under TRITON_INTERPRET=1 on CPU, on the device in the gpu lane; includes a draw at the u < 1 cap."""
    from grm_engine.decode.noise_triton import uniform_noise_triton
    from grm_engine.decode.sampler import mix32, row_keys, to_int32_bits

    device = "cuda" if torch.cuda.is_available() else "cpu"
    keys = random_keys(6, seed=9)
    for vocab_size in (1, 1000, 3333):
        fast = uniform_noise_triton(to_int32_bits(row_keys(keys)).to(device), vocab_size).cpu()
        assert torch.equal(fast, uniform_noise_reference(keys, vocab_size))
    # a key row whose top 24-bit draw sits at token `col` (the cap below 1 applies there)
    edge = torch.tensor([[5, 0, r, 100] for r in range(64)])
    bits = mix32(row_keys(edge)[:, None] ^ mix32(torch.arange(152064) ^ 0x082EFA98)[None, :])
    row, col = [int(i) for i in ((bits >> 8) == 0xFFFFFF).nonzero()[0]]
    fast = uniform_noise_triton(to_int32_bits(row_keys(edge[row:row + 1])).to(device), col + 1, block=4096).cpu()
    assert torch.equal(fast, uniform_noise_reference(edge[row:row + 1], col + 1)) and fast[0, col] < 1


def test_sampling_arrays_hold_each_rows_key_and_params():
    """SamplingArrays.build (numpy) == the per-row formula: key (seed, request key, sample index, length)."""
    from grm_engine.decode import SamplingParams
    from grm_engine.decode.decoder import SamplingArrays
    from grm_engine.decode.sampler import row_keys, to_int32_bits
    from grm_engine.decode.sequence import Sequence

    shared = SamplingParams(temperature=0.7, top_k=5)
    mixed = [shared, SamplingParams(temperature=0.0, top_p=0.9, logprobs=True), SamplingParams(top_k=3)]
    seeds = [(2**63 - 1, 0), (12345, 2**32 - 1), (0, 7)]
    for params in ([shared] * 3, mixed):
        seqs = [Sequence(10 + i, i % 3, i, list(range(3 + i)), 3, params[i % 3]) for i in range(7)]
        host = SamplingArrays.build(seqs, seeds)
        keys = torch.tensor([[*seeds[s.request_index], s.sample_index, len(s)] for s in seqs], dtype=torch.int64)
        assert torch.equal(torch.from_numpy(host.row_hash), to_int32_bits(row_keys(keys)))
        assert host.temperature.tolist() == [torch.tensor(s.params.temperature).item() for s in seqs]
        assert host.top_p.tolist() == [torch.tensor(s.params.top_p).item() for s in seqs]
        assert host.top_k.tolist() == [s.params.top_k for s in seqs]
        assert host.want_logprobs == any(s.params.logprobs for s in seqs)
        assert (host.all_greedy, host.any_greedy) == (False, any(s.params.temperature == 0 for s in seqs))
        assert host.any_filter
