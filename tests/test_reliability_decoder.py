"""The decoder after an exception or Ctrl-C inside generate(): its block pool and prefix cache are as if the call
never happened, so the next call's greedy output equals a fresh decoder's (issue 16, fault 3)."""
import pytest

from grm_engine.decode import Decoder, SamplingParams

from test_decode_models import make_prompts, tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def long_prompts():
    shared = list(range(10, 58))  # 48 tokens: 12 blocks of 4, prefilled in chunks of 16
    return [shared + [200, 201, 202], shared + [300, 301], *make_prompts(seed=6)[:2]]


def greedy_tokens(decoder, prompts):
    return [r.outputs[0].token_ids for r in decoder.generate(prompts, GREEDY, use_tqdm=False)]


def fail_on_call(decoder, monkeypatch, call_number, error):
    """The runner's prefill raises on its call_number-th call (after the scheduler registered that step's blocks)."""
    run = decoder.runner.run
    calls = {"n": 0}

    def failing_run(batch):
        calls["n"] += 1
        if calls["n"] == call_number:
            raise error
        return run(batch)
    monkeypatch.setattr(decoder.runner, "run", failing_run)
    return lambda: monkeypatch.setattr(decoder.runner, "run", run)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("call_number", [1, 2, 3])
def test_interrupted_prefill_does_not_poison_the_prefix_cache(tmp_path, monkeypatch, error, call_number):
    # From a directory, not a live module: a live module's decoder resets its prefix cache at every call.
    tiny_model("llama", seed=7).save_pretrained(tmp_path)
    prompts = long_prompts()
    options = dict(device="cpu", num_kv_blocks=96, block_size=4, max_num_batched_tokens=16, cuda_graphs=False)
    expected = greedy_tokens(Decoder.from_pretrained(str(tmp_path), **options), prompts)
    decoder = Decoder.from_pretrained(str(tmp_path), **options)
    restore = fail_on_call(decoder, monkeypatch, call_number, error)
    with pytest.raises(type(error)):
        decoder.generate(prompts, GREEDY, use_tqdm=False)
    restore()
    manager = decoder.block_manager
    assert manager.num_blocks_in_use == 0 and not manager.pending_registrations
    manager.check_invariants([])
    assert greedy_tokens(decoder, prompts) == expected
    assert decoder.stats.prefix_cache_hit_tokens >= 48  # the cache is used, not just emptied
    assert greedy_tokens(decoder, prompts) == expected  # and the cache it built since is sound too


def test_committed_blocks_stay_cached_after_an_abort():
    """Blocks of steps that ran keep their hash (a later call hits them); those of the aborted step do not."""
    from grm_engine.decode.block_manager import BlockManager
    from test_decode_scheduling import seq

    manager = BlockManager(num_blocks=16, block_size=4)
    a = seq(1, list(range(13)))
    manager.allocate(a)
    manager.register_full_blocks(a, 4)
    manager.commit_registrations()  # the step that wrote block 0 ran
    manager.register_full_blocks(a, 12)  # blocks 1 and 2: this step is aborted
    manager.drop_pending_registrations()
    manager.free(a)
    manager.check_invariants([])
    b = seq(2, list(range(13)))
    assert manager.allocate(b) and b.num_computed_tokens == 4
