"""Block manager invariants, prefix sharing, fork/copy-on-write, preemption and seeded sampling determinism."""
import random

import pytest
import torch

from grm_engine.decode import Decoder, SamplingParams
from grm_engine.decode.block_manager import BlockManager
from grm_engine.decode.sequence import Sequence

from test_decode_models import tiny_model


def seq(seq_id, tokens, n=1):
    return Sequence(seq_id, seq_id, 0, tokens, len(tokens), SamplingParams(), num_samples_to_fork=n)


def test_prefix_hits_need_equal_tokens_and_the_last_token_is_recomputed():
    manager = BlockManager(num_blocks=16, block_size=4)
    a = seq(1, list(range(10)))
    assert manager.allocate(a) and a.num_computed_tokens == 0
    manager.register_full_blocks(a, 10)  # blocks [0..3], [4..7] are full
    b = seq(2, list(range(8)) + [99, 98, 97])
    assert manager.allocate(b) and b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    c = seq(3, list(range(8)))  # fully cached prompt: its last block is recomputed, not shared
    assert manager.allocate(c) and c.num_computed_tokens == 4 and c.block_table[1] != a.block_table[1]
    d = seq(4, [0, 1, 2, 5, 4, 5, 6, 7, 8])  # differs in block 0: no hit at all
    assert manager.allocate(d) and d.num_computed_tokens == 0
    live = [a, b, c, d]
    manager.check_invariants(live)
    for s in live:
        manager.free(s)
    manager.check_invariants([])
    assert manager.num_free_blocks == 16
    e = seq(5, list(range(9)))  # freed blocks keep their contents and can still be hit
    assert manager.allocate(e) and e.num_computed_tokens == 8


def test_fork_copy_on_write_never_alters_a_shared_block():
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = seq(1, list(range(6)))
    manager.allocate(parent)
    parent.num_computed_tokens = 6
    manager.register_full_blocks(parent, 6)
    child = parent.fork(2, 1)
    manager.fork(parent, child)
    shared_tail = parent.block_table[1]
    assert manager.blocks[shared_tail].ref_count == 2
    parent.token_ids.append(100)
    child.token_ids.append(101)
    copy = manager.append_slot(child)  # the child writes position 6 in the shared partial block: copy first
    assert copy == (shared_tail, child.block_table[1]) and child.block_table[1] != shared_tail
    assert manager.append_slot(parent) is None  # now the parent owns its tail alone
    assert parent.block_table[1] == shared_tail and parent.block_table[0] == child.block_table[0]
    manager.check_invariants([parent, child])
    manager.free(parent)
    manager.free(child)
    manager.check_invariants([])


def test_random_workload_keeps_invariants():
    rng = random.Random(0)
    manager = BlockManager(num_blocks=40, block_size=4)
    live = []
    for step in range(400):
        action = rng.random()
        if action < 0.3:
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]  # few symbols: many prefix hits
            s = seq(step, tokens)
            if manager.allocate(s):
                s.num_computed_tokens = len(s)
                manager.register_full_blocks(s, len(s))
                live.append(s)
        elif action < 0.45 and live:
            parent = rng.choice(live)
            child = parent.fork(1000 + step, 1)
            manager.fork(parent, child)
            live.append(child)
        elif action < 0.85 and live:
            s = rng.choice(live)
            s.token_ids.append(rng.randrange(3))
            if manager.num_blocks_to_append(s) <= manager.num_free_blocks:
                before = {b: tuple(manager.blocks[b].token_ids) for b in s.block_table if manager.blocks[b].ref_count > 1}
                manager.append_slot(s)
                s.num_computed_tokens += 1
                manager.register_last_block_if_full(s)
                for b, tokens in before.items():  # shared blocks keep their identity and contents
                    assert tuple(manager.blocks[b].token_ids) == tokens
            else:
                s.token_ids.pop()
        elif live:
            manager.free(live.pop(rng.randrange(len(live))))
        manager.check_invariants(live)
    for s in live:
        manager.free(s)
    manager.check_invariants([])
    assert manager.num_free_blocks == manager.num_blocks


def test_n_samples_prefill_the_prompt_once_and_free_every_block():
    model = tiny_model("qwen2")
    decoder = Decoder.from_pretrained(model, num_kv_blocks=256, block_size=4)
    prompt = list(range(10, 47))  # 37 tokens: the last block is partial, so forks copy it on write
    params = SamplingParams(n=6, temperature=0.7, max_tokens=20, seed=3, ignore_eos=True, logprobs=True)
    out = decoder.generate([prompt], params, use_tqdm=False)
    assert decoder.stats.prefill_tokens == len(prompt)
    # Each sample's log-probs equal a teacher-forced transformers forward over its own tokens: a sibling
    # writing into a shared block (a copy-on-write bug) would change the K/V the others read.
    for sample in out[0].outputs:
        ids = torch.tensor([prompt + sample.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(sample.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(sample.logprobs), expected, atol=2e-5, rtol=1e-5)
    assert len(out[0].outputs) == 6 and all(len(s.token_ids) == 20 for s in out[0].outputs)
    assert len({tuple(s.token_ids) for s in out[0].outputs}) > 1  # distinct samples
    assert decoder.block_manager.num_blocks_in_use == 0
    decoder.block_manager.check_invariants([])
    # unique KV only: 10 prompt blocks shared, each sample owns its tail and new blocks
    assert decoder.stats.peak_blocks_in_use <= 10 + 6 * (-(-(1 + 20) // 4) + 1)


def run_requests(decoder, prompts, params):
    return [[s.token_ids for s in r.outputs] for r in decoder.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 1.0), (1.3, 20, 0.9)])
def test_seeded_samples_do_not_depend_on_batch_or_preemption(temperature, top_k, top_p):
    model = tiny_model("llama", seed=5)
    prompt = list(range(20, 50))
    others = [list(range(60, 75)), list(range(80, 131)), [9, 9, 9]]
    params = SamplingParams(n=4, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=24, seed=11, ignore_eos=True)
    roomy = Decoder.from_pretrained(model, num_kv_blocks=512, block_size=4)
    alone = run_requests(roomy, [prompt], params)[0]
    mixed = run_requests(roomy, [prompt] + others, params)[0]
    assert roomy.stats.preemptions == 0
    tiny_pool = Decoder.from_pretrained(model, num_kv_blocks=28, block_size=4, max_num_batched_tokens=16)
    squeezed = run_requests(tiny_pool, [prompt] + others, params)[0]
    assert tiny_pool.stats.preemptions > 0
    tiny_pool.block_manager.check_invariants([])
    assert tiny_pool.block_manager.num_blocks_in_use == 0
    assert alone == mixed == squeezed
    other_seed = run_requests(roomy, [prompt], SamplingParams(**{**params.__dict__, "seed": 12}))[0]
    assert other_seed != alone


def test_request_key_makes_samples_independent_of_the_request_position():
    model = tiny_model("llama", seed=5)
    prompt, other = list(range(20, 50)), list(range(60, 75))
    decoder = Decoder.from_pretrained(model, num_kv_blocks=256, block_size=4)
    keyed = SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=7, ignore_eos=True, request_key=5)
    first = decoder.generate([prompt, other], [keyed, keyed], use_tqdm=False)
    second = decoder.generate([other, other, prompt], [keyed, keyed, keyed], use_tqdm=False)
    assert [o.token_ids for o in first[0].outputs] == [o.token_ids for o in second[2].outputs]
    # without a key the position in the call is part of the noise key
    plain = SamplingParams(**{**keyed.__dict__, "request_key": None})
    at_zero = decoder.generate([prompt], plain, use_tqdm=False)[0]
    at_one = decoder.generate([other, prompt], plain, use_tqdm=False)[1]
    assert [o.token_ids for o in at_zero.outputs] != [o.token_ids for o in at_one.outputs]
    with pytest.raises(ValueError, match="request_key"):
        SamplingParams(request_key=-1)


def test_greedy_under_preemption_matches_roomy_pool():
    model = tiny_model("gemma2", seed=2)
    prompts = [list(range(5, 40)), list(range(50, 60)), list(range(70, 100))]
    params = SamplingParams(n=3, temperature=0, max_tokens=30, ignore_eos=True)
    roomy = run_requests(Decoder.from_pretrained(model, num_kv_blocks=256, block_size=4), prompts, params)
    small = Decoder.from_pretrained(model, num_kv_blocks=24, block_size=4)
    assert run_requests(small, prompts, params) == roomy and small.stats.preemptions > 0


def test_stop_token_ids_and_max_tokens():
    model = tiny_model("llama")
    decoder = Decoder.from_pretrained(model, num_kv_blocks=64, block_size=8)
    free_run = decoder.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_at = free_run.token_ids[4]
    first = free_run.token_ids.index(stop_at)
    stopped = decoder.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free_run.token_ids[: first + 1] and stopped.finish_reason == "stop"


def test_sampler_noise_is_a_pure_function_of_its_key():
    from grm_engine.decode.sampler import uniform_noise

    keys = torch.tensor([[7, 0, 0, 5], [7, 0, 1, 5], [7, 1, 0, 5], [7, 0, 0, 6], [2**40 + 7, 0, 0, 5]])
    u = uniform_noise(keys, 1000)
    assert ((u > 0) & (u < 1)).all()
    assert torch.equal(uniform_noise(keys[2:3], 1000)[0], u[2])  # a row does not depend on its neighbours
    for i in range(5):
        for j in range(i + 1, 5):
            assert (u[i] != u[j]).float().mean() > 0.99
    # roughly uniform: mean 0.5, variance 1/12
    big = uniform_noise(torch.tensor([[1, 2, 3, 4]]), 200_000)
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.003


def test_sampling_follows_the_distribution():
    """Gumbel-max with top-k/top-p draws from the renormalized filtered softmax."""
    from grm_engine.decode.sampler import sample

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    keys = torch.stack([torch.full((20000,), 9), torch.zeros(20000, dtype=torch.long), torch.arange(20000), torch.zeros(20000, dtype=torch.long)], 1)
    ones = torch.ones(20000)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.8)]:
        tokens, _ = sample(logits, ones * temperature, torch.full((20000,), top_k), ones * top_p, keys)
        probs = torch.softmax(logits[0] / temperature, -1)
        keep = torch.ones(6, dtype=torch.bool)
        if top_k:
            keep[top_k:] = False
        if top_p < 1:
            keep = (torch.cumsum(probs, 0) - probs) < top_p
        expected = torch.where(keep, probs, torch.zeros_like(probs))
        expected /= expected.sum()
        observed = torch.bincount(tokens, minlength=6).float() / 20000
        torch.testing.assert_close(observed, expected, atol=0.012, rtol=0)
