"""The decode step padded to a batch bucket and replayed from CUDA graphs (grm_engine/decode/cuda_graphs.py).

CPU lane: the padded step (run eagerly, Triton kernels under the interpreter) gives the unpadded step's tokens.
GPU lane: graphs on == graphs off bit for bit (tokens and log-probs), across bucket changes, sampler modes,
sliding-window / soft-capped layers and preemption; captured graphs are reused.
"""
import pytest
import torch

from grm_engine.decode import Decoder, SamplingParams
from grm_engine.decode.cuda_graphs import DecodeGraphs, StepBuffers, StepKey, batch_buckets, step_fields
from test_decode_models import make_prompts, tiny_model


def test_batch_buckets():
    assert batch_buckets(256)[:6] == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(256)[-3:] == [192, 224, 256]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(1) == [1]


def test_step_buffers_views_do_not_overlap():
    key = StepKey(8, 16, (False, False, False, False), 2, cascade=(4, 1, 1))
    buffers = StepBuffers(step_fields(key), torch.device("cpu"))
    for i, view in enumerate(buffers.host_views.values()):
        view[...] = i + 1
    buffers.upload()
    for i, (name, view) in enumerate(buffers.device_views.items()):
        assert bool((view == i + 1).all()), name


def outputs(decoder, prompts, params):
    results = decoder.generate(prompts, params, use_tqdm=False)
    return [[(s.token_ids, s.logprobs) for s in r.outputs] for r in results]


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_padded_step_matches_unpadded_on_cpu(family, monkeypatch):
    """The bucketed step (padding rows, widened block tables, fixed splits) == the plain eager step."""
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    model = tiny_model(family, seed=3)
    prompts = make_prompts()[:3]
    params = [SamplingParams(n=3, temperature=0.8, top_k=20, max_tokens=6 + 3 * i, seed=5, ignore_eos=True, logprobs=True)
              for i in range(len(prompts))]
    plain = Decoder.from_pretrained(model, num_kv_blocks=64, block_size=4, max_num_seqs=16)
    padded = Decoder.from_pretrained(model, num_kv_blocks=64, block_size=4, max_num_seqs=16)
    padded.runner.graphs = DecodeGraphs(padded.model, padded.runner.layer_caches, 4, 16, enabled=False)
    ours, ref = outputs(padded, prompts, params), outputs(plain, prompts, params)
    assert [[t for t, _ in r] for r in ours] == [[t for t, _ in r] for r in ref]
    for r_ours, r_ref in zip(ours, ref):
        for (_, lp_ours), (_, lp_ref) in zip(r_ours, r_ref):
            torch.testing.assert_close(torch.tensor(lp_ours), torch.tensor(lp_ref), atol=1e-4, rtol=1e-4)
    assert padded.runner.graphs.buffers, "the padded path did not run"


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_graphs_on_equal_graphs_off_gpu(family):
    from decode_helpers import medium_prompts as gpu_prompts
    from test_decode_gpu import medium_model

    model = medium_model(family)
    prompts = gpu_prompts()
    cases = [
        SamplingParams(n=5, temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=True),  # greedy
        [SamplingParams(n=4, temperature=1.0, top_p=0.9, top_k=50, max_tokens=20 + 15 * i, seed=2, ignore_eos=True,
                        logprobs=True) for i in range(len(prompts))],  # filters; batch shrinks through buckets
        SamplingParams(n=7, temperature=0.7, max_tokens=33, seed=9, ignore_eos=True),  # no filter, no log-probs
    ]
    on = Decoder.from_pretrained(model, max_num_seqs=32, num_kv_blocks=2048)
    off = Decoder.from_pretrained(model, max_num_seqs=32, num_kv_blocks=2048, cuda_graphs=False)
    for params in cases:
        assert outputs(on, prompts, params) == outputs(off, prompts, params)
    assert on.runner.graphs.graphs and not off.runner.graphs.graphs
    captured = len(on.runner.graphs.graphs)
    outputs(on, prompts, cases[0])
    assert len(on.runner.graphs.graphs) == captured, "a repeated run captured new graphs"


@pytest.mark.gpu
def test_graphs_with_preemption_gpu():
    """A pool too small for every sample: preempted sequences recompute, graphs keep giving the eager tokens."""
    from decode_helpers import medium_prompts as gpu_prompts
    from test_decode_gpu import medium_model

    model = medium_model("llama")
    params = SamplingParams(n=8, temperature=1.0, max_tokens=64, seed=4, ignore_eos=True)
    on = Decoder.from_pretrained(model, max_num_seqs=32, num_kv_blocks=160)
    off = Decoder.from_pretrained(model, max_num_seqs=32, num_kv_blocks=300, cuda_graphs=False)
    assert outputs(on, gpu_prompts(), params) == outputs(off, gpu_prompts(), params)
    assert on.stats.preemptions > 0


def test_shared_prefix_step_matches_plain_on_cpu(monkeypatch):
    """Samples of a shared prompt go through the shared-prefix kernel (rows regrouped, work lists padded) and give
    the plain step's tokens; a short prompt in the same batch stays on the plain path. The crossover thresholds
    are lowered so that the interpreter runs small shapes."""
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    model = tiny_model("qwen2", seed=4)
    g = torch.Generator().manual_seed(0)
    prompts = [list(range(20, 27)), torch.randint(4, 384, (70,), generator=g).tolist()]
    params = SamplingParams(n=5, temperature=0.9, max_tokens=5, seed=3, ignore_eos=True, logprobs=True)
    kwargs = dict(num_kv_blocks=256, block_size=4, max_num_seqs=16)
    plain = Decoder.from_pretrained(model, cascade_attention=False, **kwargs)
    shared = Decoder.from_pretrained(model, **kwargs)
    shared.runner.graphs = DecodeGraphs(shared.model, shared.runner.layer_caches, 4, 16, enabled=False)
    shared.runner.cascade_thresholds = dict(min_prefix_tokens=32, min_samples=4)
    ours, ref = outputs(shared, prompts, params), outputs(plain, prompts, params)
    assert [[t for t, _ in r] for r in ours] == [[t for t, _ in r] for r in ref]
    for r_ours, r_ref in zip(ours, ref):
        for (_, lp_ours), (_, lp_ref) in zip(r_ours, r_ref):
            torch.testing.assert_close(torch.tensor(lp_ours), torch.tensor(lp_ref), atol=1e-4, rtol=1e-4)
    assert any(key.cascade is not None for key in shared.runner.graphs.buffers), "the shared-prefix path did not run"


@pytest.mark.gpu
def test_shared_prefix_close_to_plain_gpu():
    """bf16: the 1,300-token prompt's samples take the shared-prefix kernel; its greedy log-probs match the plain
    kernel's up to bf16 rounding wherever the tokens still agree (a near tie may flip a later token)."""
    from decode_helpers import medium_prompts as gpu_prompts
    from test_decode_gpu import medium_model

    model = medium_model("qwen2")
    params = SamplingParams(n=8, temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=True)
    shared = Decoder.from_pretrained(model, max_num_seqs=32, num_kv_blocks=2048)
    shared.runner.cascade_thresholds = dict(min_prefix_tokens=1024)  # the default (2,048) is above this prompt
    plain = Decoder.from_pretrained(model, max_num_seqs=32, num_kv_blocks=2048, cascade_attention=False)
    ours, ref = outputs(shared, gpu_prompts(), params), outputs(plain, gpu_prompts(), params)
    assert any(key.cascade is not None for key in shared.runner.graphs.buffers), "the shared-prefix path did not run"
    for r_ours, r_ref in zip(ours, ref):
        for (t_ours, lp_ours), (t_ref, lp_ref) in zip(r_ours, r_ref):
            same = next((i for i, (a, b) in enumerate(zip(t_ours, t_ref)) if a != b), len(t_ref))
            assert same >= 4, f"tokens diverge at {same}"
            torch.testing.assert_close(torch.tensor(lp_ours[:same]), torch.tensor(lp_ref[:same]), atol=0.05, rtol=0.05)


def test_run_ahead_stops_and_preemption_on_cpu(monkeypatch):
    """The padded path runs decode steps one ahead of the bookkeeping; samples stopping at a token (found one
    step late), stop strings are not involved; a small pool forces preemption (the pipeline drains first)."""
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    model = tiny_model("llama", seed=5)
    prompts = make_prompts()[:2]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=11, stop_token_ids=[7, 40, 41, 42, 43, 44])
    for blocks in (128, 16):
        plain = Decoder.from_pretrained(model, num_kv_blocks=blocks, block_size=4, max_num_seqs=16)
        ahead = Decoder.from_pretrained(model, num_kv_blocks=blocks, block_size=4, max_num_seqs=16)
        ahead.runner.graphs = DecodeGraphs(ahead.model, ahead.runner.layer_caches, 4, 16, enabled=False)
        ours, ref = outputs(ahead, prompts, params), outputs(plain, prompts, params)
        assert ours == ref
        lengths = {len(t) for r in ours for t, _ in r}
        assert len(lengths) > 2, "samples should stop at different lengths"
        assert ahead.block_manager.num_free_blocks == blocks, "blocks leaked"
        if blocks == 16:
            assert ahead.stats.preemptions > 0 and plain.stats.preemptions > 0


def test_run_ahead_stop_strings_and_context_end_on_cpu(monkeypatch):
    """One step ahead: a stop string (seen one step late, the extra token dropped) and the model's context end
    (a length finish known at launch) give the plain loop's outputs, text included."""
    from test_decode_api import CharTokenizer

    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    model = tiny_model("qwen2", seed=6)
    prompts = ["hello", "worlds", "abcabcabcabc"]
    kwargs = dict(tokenizer=CharTokenizer(), num_kv_blocks=128, block_size=4, max_num_seqs=16, max_model_len=24)
    plain = Decoder.from_pretrained(model, **kwargs)
    free = plain.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=40, seed=2), use_tqdm=False)
    stop = free[0].outputs[1].text[3:5]  # a string that sample 1 of request 0 produces mid-way
    params = SamplingParams(n=3, temperature=1.0, max_tokens=40, seed=2, stop=[stop])
    ahead = Decoder.from_pretrained(model, **kwargs)
    ahead.runner.graphs = DecodeGraphs(ahead.model, ahead.runner.layer_caches, 4, 16, enabled=False)
    ours, ref = ahead.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)
    summary = lambda results: [[(s.token_ids, s.text, s.finish_reason) for s in r.outputs] for r in results]  # noqa: E731
    assert summary(ours) == summary(ref)
    reasons = {s.finish_reason for r in ours for s in r.outputs}
    assert reasons == {"stop", "length"}, reasons  # stop strings and the 24-token context end both happen
    assert ahead.block_manager.num_free_blocks == 128


def test_eager_shapes_keep_few_buffers():
    """With graphs off, every new step shape gets a buffer; only the newest MAX_EAGER_BUFFERS are kept."""
    from grm_engine.decode.cuda_graphs import MAX_EAGER_BUFFERS

    import types

    graphs = DecodeGraphs(types.SimpleNamespace(device=torch.device("cpu")), [], 4, 64, enabled=False)
    for width in range(MAX_EAGER_BUFFERS + 5):
        key = StepKey(8, 16 * (width + 1), (False, False, False, False), 2)
        graphs._evict_uncaptured_buffers()
        graphs.buffers[key] = object()
    assert len(graphs.buffers) == MAX_EAGER_BUFFERS
    assert StepKey(8, 16 * (MAX_EAGER_BUFFERS + 5), (False, False, False, False), 2) in graphs.buffers


def test_multi_step_rounds_match_single_steps_on_cpu(monkeypatch):
    """num_scheduler_steps = 5 (rounds of 5 decode steps launched before the host sees their tokens, crossing
    blocks of 4) gives the tokens and log-probs of rounds of 1: samples stopping mid-round (stop tokens), uneven
    max_tokens (rows sitting out a round's last steps), a small pool (rounds fall back to single steps that may
    preempt; 4 seats: waiting requests join when a round ends), and the blocks come back."""
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    model = tiny_model("qwen2", seed=7)
    prompts = make_prompts()[:2]
    params = [SamplingParams(n=3, temperature=1.0, max_tokens=7 + 4 * i, seed=13, logprobs=True,
                             stop_token_ids=[7, 40, 41, 42]) for i in range(len(prompts))]
    for blocks, seats in ((20, 16), (128, 4)):  # 20 blocks: rounds fall back to steps that preempt; 4 seats: a
        # request waits for seats while rounds run
        runs = {}
        for steps in (1, 5):
            decoder = Decoder.from_pretrained(model, num_kv_blocks=blocks, block_size=4, max_num_seqs=seats,
                                              num_scheduler_steps=steps)
            decoder.runner.graphs = DecodeGraphs(decoder.model, decoder.runner.layer_caches, 4, seats, enabled=False,
                                                 steps_per_round=steps)
            rounds = []
            inner = decoder.runner.decode_round
            decoder.runner.decode_round = lambda *a, _inner=inner, _rounds=rounds: _rounds.append(a[3]) or _inner(*a)
            runs[steps] = (outputs(decoder, prompts, params), rounds, decoder)
        (single, single_rounds, _), (multi, multi_rounds, decoder) = runs[1], runs[5]
        assert [[t for t, _ in r] for r in multi] == [[t for t, _ in r] for r in single]
        for r_multi, r_single in zip(multi, single):
            for (_, lp_multi), (_, lp_single) in zip(r_multi, r_single):  # batch composition differs: float noise
                torch.testing.assert_close(torch.tensor(lp_multi), torch.tensor(lp_single), atol=1e-5, rtol=1e-5)
        assert 5 in multi_rounds and set(single_rounds) == {1}
        lengths = {len(t) for r in multi for t, _ in r}
        assert len(lengths) > 2, "samples should stop at different lengths"
        assert decoder.block_manager.num_free_blocks == blocks, "blocks leaked"
