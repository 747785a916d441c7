"""GRPO loss: the reference against a per-token float64 transcription of TRL's formulas, the Triton kernels
(TRITON_INTERPRET=1 on CPU) against the reference, and the GPU lane (pytest -m gpu) in bf16 at real sizes."""
import math
import zlib
import statistics

import pytest
import torch

import grm_engine
from grm_engine.loss import (GRPOStats, fused_linear_grpo_loss_reference, group_advantages, grpo_loss_reference,
                             token_logprobs_reference)

B, T, V, BLOCK_V = 4, 6, 50, 16  # V not a multiple of the block: a partial last chunk


def make_inputs(seed, *, batch=B, length=T, vocab=V, dtype=torch.float32, device="cpu", scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length + 1, vocab, generator=gen) * scale).to(dtype).to(device)
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    mask = (torch.rand(batch, length, generator=gen) > 0.25).to(device)
    mask[1] = False  # a fully masked sequence
    ids = torch.where(mask, ids, -100)  # padding ids at masked positions (never read)
    # old/ref near the true log-probs of logits[:, :-1], so ratios fall on both sides of the clip range
    logp_like = torch.log_softmax(logits[:, :-1].float().cpu(), -1).gather(-1, ids.cpu().clamp(min=0)[..., None]).squeeze(-1)
    # log-ratios cycle through above, below and inside the clip range, for every sequence
    offsets = torch.tensor([-0.5, 0.5, 0.05]).repeat(length)[:length] + torch.randn(batch, length, generator=gen) * 0.02
    old = (logp_like + offsets).to(device)
    ref = (logp_like + torch.randn(batch, length, generator=gen) * 0.5).to(device)
    rewards = torch.randint(0, 2, (batch,), generator=gen).float().to(device) * 2 - 1
    advantages = torch.randn(batch, generator=gen).to(device)
    return logits, ids, mask, old, ref, rewards, advantages


# ----------------------------------------------------------------------------- group_advantages

def test_group_advantages_matches_statistics_module():
    rewards = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0])
    got = group_advantages(rewards, 4)
    for g in range(3):
        group = rewards[4 * g: 4 * g + 4].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        for i, r in enumerate(group):
            assert got[4 * g + i].item() == pytest.approx((r - mean) / (std + 1e-4), rel=1e-5, abs=1e-6)
    assert torch.all(got[4:8] == 0)  # equal rewards -> A = 0, not NaN
    batch_std = statistics.stdev(rewards.tolist())
    got_batch = group_advantages(rewards, 4, scale="batch")
    assert got_batch[8].item() == pytest.approx((3.0 - 1.5) / (batch_std + 1e-4), rel=1e-5)
    assert group_advantages(rewards, 4, scale="none")[8].item() == pytest.approx(1.5)


@pytest.mark.parametrize("call, message", [
    (lambda: group_advantages(torch.ones(6), 4), "divisible"),
    (lambda: group_advantages(torch.ones(6), 1), "group_size=1"),
    (lambda: group_advantages(torch.ones(6), 2, scale="rank"), "scale"),
    (lambda: group_advantages(torch.ones(2, 3), 3), "1-D"),
])
def test_group_advantages_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- reference vs TRL transcription

def trl_loss_float64(logits, ids, mask, adv, old, ref, beta, eps_low, eps_high, temperature, loss_type, max_len):
    """Per-token loops in Python floats: TRL's GRPOTrainer formulas, written independently of grm_engine."""
    batch, length, _ = logits.shape
    per_seq, total, count = [], 0.0, 0
    for b in range(batch):
        seq_sum, seq_count = 0.0, 0
        for t in range(length):
            if not mask[b, t]:
                continue
            row = [x / temperature for x in logits[b, t].tolist()]
            top = max(row)
            logp = row[ids[b, t]] - (top + math.log(sum(math.exp(x - top) for x in row)))
            ratio = 1.0 if old is None else math.exp(logp - old[b, t].item())
            a = adv[b].item()
            loss = -min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a)
            if ref is not None and beta != 0:
                gap = ref[b, t].item() - logp
                loss += beta * (math.exp(gap) - gap - 1)
            seq_sum += loss
            seq_count += 1
        per_seq.append(seq_sum / max(seq_count, 1))
        total += seq_sum
        count += seq_count
    if loss_type == "grpo":
        return sum(per_seq) / batch
    if loss_type == "bnpo":
        return total / max(count, 1)
    return total / (batch * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("with_old", [False, True])
def test_reference_matches_trl_transcription(loss_type, with_old):
    logits, ids, mask, old, ref, _, adv = make_inputs(1)
    logits = logits[:, :-1]
    kwargs = dict(beta=0.08, eps_low=0.2, eps_high=0.28, temperature=0.9, loss_type=loss_type)
    loss, stats = grpo_loss_reference(logits, ids, mask, advantages=adv, old_logp=old if with_old else None,
                                      ref_logp=ref, max_completion_length=9, **kwargs)
    want = trl_loss_float64(logits, ids, mask, adv, old if with_old else None, ref, max_len=9, **kwargs)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert isinstance(stats, GRPOStats) and stats.logp.shape == (B, T) and not stats.logp.requires_grad


# ----------------------------------------------------------------------------- Triton vs reference

def run_both(logits, ids, mask, *, upstream=1.0, inplace=True, **kwargs):
    """Reference and Triton on the same inputs; returns (loss, stats, grad) for each."""
    from grm_engine.kernels.grpo_loss import grpo_loss_triton

    ref_logits = logits.detach().clone().requires_grad_()
    ref_loss, ref_stats = grpo_loss_reference(ref_logits, ids, mask, **kwargs)
    (ref_loss * upstream).backward()
    # a non-leaf strided view (the logits[:, :-1] slice of a bigger buffer), as a model's output would be
    full = torch.cat([logits.detach(), torch.full_like(logits[:, :1], 7.0)], dim=1).requires_grad_()
    view = full[:, :-1]
    fast_loss, fast_stats = grpo_loss_triton(view, ids, mask, inplace=inplace, block_v=BLOCK_V, **kwargs)
    (fast_loss * upstream).backward()
    assert torch.all(full.grad[:, -1] == 0)
    return (ref_loss, ref_stats, ref_logits.grad), (fast_loss, fast_stats, full.grad[:, :-1])


def assert_close_results(ref, fast, rtol=1e-5, atol=1e-6):
    (ref_loss, ref_stats, ref_grad), (fast_loss, fast_stats, fast_grad) = ref, fast
    torch.testing.assert_close(fast_loss, ref_loss.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(fast_stats.logp, ref_stats.logp, rtol=rtol, atol=atol)
    torch.testing.assert_close(fast_stats.kl, ref_stats.kl, rtol=rtol, atol=atol)
    torch.testing.assert_close(fast_stats.clip_frac, ref_stats.clip_frac, rtol=rtol, atol=atol)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=rtol, atol=atol * max(1.0, ref_grad.abs().max().item()))
    assert torch.isfinite(fast_grad).all() and torch.isfinite(fast_loss)


OPTION_SETS = [
    dict(),
    dict(old=True),
    dict(old=True, ref=True),
    dict(ref=True, beta=0.0),
    dict(rewards=True, ref=True),
    dict(adv_per_token=True, old=True, ref=True, temperature=0.7, eps_high=0.28),
]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
def test_triton_matches_reference(loss_type, options):
    logits, ids, mask, old, ref, rewards, adv = make_inputs(zlib.crc32(repr((loss_type, options)).encode()) % 1000)
    logits = logits[:, :-1]
    kwargs = dict(loss_type=loss_type, temperature=options.get("temperature", 1.0),
                  beta=options.get("beta", 0.08), eps_high=options.get("eps_high", 0.2))
    if loss_type == "dr_grpo":
        kwargs["max_completion_length"] = 11
    if options.get("rewards"):
        kwargs.update(rewards=rewards, group_size=2)
    elif options.get("adv_per_token"):
        kwargs["advantages"] = torch.randn(B, T).t().contiguous().t()  # [B, T] with transposed strides
    else:
        kwargs["advantages"] = adv
    if options.get("old"):
        kwargs["old_logp"] = old
    if options.get("ref"):
        kwargs["ref_logp"] = ref
    ref_result, fast_result = run_both(logits, ids, mask, **kwargs)
    assert_close_results(ref_result, fast_result)
    if options.get("old"):
        assert 0 < fast_result[1].clip_frac.item() < 1  # the case actually exercises the clip


@pytest.mark.parametrize("inplace", [True, False])
def test_upstream_gradient_and_inplace_option(inplace):
    logits, ids, mask, old, ref, _, adv = make_inputs(5)
    ref_result, fast_result = run_both(logits[:, :-1], ids, mask, upstream=-2.5, inplace=inplace, advantages=adv,
                                       old_logp=old, ref_logp=ref)
    assert_close_results(ref_result, fast_result)


def test_inplace_writes_gradient_into_logits_and_optout_keeps_them():
    from grm_engine.kernels.grpo_loss import grpo_loss_triton

    logits, ids, mask, _, _, _, adv = make_inputs(6)
    for inplace in (True, False):
        leaf = logits.clone().requires_grad_()
        before = leaf.detach().clone()
        loss, _ = grpo_loss_triton(leaf, ids.clamp(min=0)[:, :1].expand(B, T + 1), torch.ones(B, T + 1), advantages=adv,
                                   inplace=inplace, block_v=BLOCK_V)
        loss.backward()
        if inplace:  # the buffer now holds dlogits (a leaf's AccumulateGrad keeps its own copy)
            assert torch.equal(leaf.detach(), leaf.grad) and not torch.equal(leaf.detach(), before)
        else:
            assert torch.equal(leaf.detach(), before)


def test_no_grad_leaves_logits_untouched():
    from grm_engine.kernels.grpo_loss import grpo_loss_triton
    from grm_engine.kernels.linear_grpo import fused_linear_grpo_loss_triton

    logits, ids, mask, old, _, _, adv = make_inputs(15)
    leaf = logits[:, :-1].clone().requires_grad_()
    before = leaf.detach().clone()
    with torch.no_grad():
        loss, _ = grpo_loss_triton(leaf, ids, mask, advantages=adv, old_logp=old, block_v=BLOCK_V)
    assert torch.equal(leaf.detach(), before) and not loss.requires_grad
    torch.testing.assert_close(loss, grpo_loss_reference(before, ids, mask, advantages=adv, old_logp=old)[0])
    hidden, weight = torch.randn(B, T, 8, requires_grad=True), torch.randn(V, 8, requires_grad=True)
    with torch.no_grad():
        loss, _ = fused_linear_grpo_loss_triton(hidden, weight, ids, mask, advantages=adv, block_v=BLOCK_V)
    assert not loss.requires_grad


@pytest.mark.parametrize("variant", [dict(programs=3), dict(fused_grad=True), dict(fused_grad=True, programs=3)])
def test_kernel_variants_give_identical_results(variant):
    """Persistent programs (3 striding over the 24 rows) and the fused second sweep equal the default
    (one program per row, gradient written by _grad_rows_kernel)."""
    from grm_engine.kernels.grpo_loss import grpo_loss_triton

    logits, ids, mask, old, ref, rewards, _ = make_inputs(14)
    results = []
    for options in ({}, variant):
        leaf = logits[:, :-1].clone().requires_grad_()
        loss, stats = grpo_loss_triton(leaf, ids, mask, rewards=rewards, group_size=2, old_logp=old, ref_logp=ref,
                                       block_v=BLOCK_V, **options)
        results.append((loss.detach(), stats.logp, stats.kl, torch.autograd.grad(loss, leaf)[0]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_extreme_values_stay_finite():
    logits, ids, mask, old, ref, _, adv = make_inputs(7)
    logits = logits[:, :-1].clone()
    logits[0, :, :5] = 1e4
    logits[2, :, 5:10] = -1e4
    logits[3, :, 10:40] = float("-inf")  # banned tokens (never the target)
    ids[3] = torch.randint(40, V, (T,))
    ids[0, 0] = 20  # a target 1e4 below the row maximum: logp ~ -1e4, both ratios far beyond LOG_RATIO_MAX
    ref_result, fast_result = run_both(logits, ids, mask, advantages=adv, old_logp=old, ref_logp=ref)
    assert_close_results(ref_result, fast_result, rtol=1e-4)


def test_equal_rewards_and_all_masked_batch():
    logits, ids, _, _, ref, _, _ = make_inputs(8)
    ids = ids.clamp(min=0)  # every position is a completion token here
    rewards = torch.tensor([1.0, 1.0, -1.0, -1.0])
    ref_result, fast_result = run_both(logits[:, :-1], ids, torch.ones(B, T), rewards=rewards, group_size=2,
                                       ref_logp=ref, beta=0.0)
    assert fast_result[0].item() == 0 and torch.all(fast_result[2] == 0)  # A = 0 everywhere
    ref_result, fast_result = run_both(logits[:, :-1], ids, torch.zeros(B, T), rewards=rewards, group_size=2,
                                       ref_logp=ref)
    assert_close_results(ref_result, fast_result)
    assert fast_result[0].item() == 0 and fast_result[1].kl.item() == 0


@pytest.mark.parametrize("return_entropy", [False, True])
def test_token_logprobs_matches_reference(return_entropy):
    from grm_engine.kernels.grpo_loss import token_logprobs_triton

    logits, ids, mask, *_ = make_inputs(9)
    logits = logits[:, 1:]
    logits[0, 0, :20] = float("-inf")
    ids[0, 0] = 30
    want = token_logprobs_reference(logits, ids, mask=mask, temperature=0.8, return_entropy=return_entropy)
    got = token_logprobs_triton(logits, ids, mask=mask, temperature=0.8, return_entropy=return_entropy, block_v=BLOCK_V)
    for w, g in zip(want if return_entropy else [want], got if return_entropy else [got]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    loss_logp = grpo_loss_reference(logits, ids, mask, advantages=torch.ones(B), temperature=0.8)[1].logp
    torch.testing.assert_close(got[0] if return_entropy else got, loss_logp, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fused linear

@pytest.mark.parametrize("use_bias, loss_type, chunk_size, softcap", [
    (False, "grpo", 5, None), (False, "bnpo", 7, None), (True, "dr_grpo", 64, None),
    (False, "grpo", 5, 1.5), (True, "bnpo", 64, 1.5),  # Gemma 2's final soft-capping, small enough to matter
])
def test_fused_linear_matches_unfused_reference(use_bias, loss_type, chunk_size, softcap):
    from grm_engine.kernels.linear_grpo import fused_linear_grpo_loss_triton

    _, ids, mask, old, ref, rewards, _ = make_inputs(10)
    gen = torch.Generator().manual_seed(11)
    tensors = [torch.randn(B, T, 12, generator=gen), torch.randn(V, 12, generator=gen) * 0.5]
    if use_bias:
        tensors.append(torch.randn(V, generator=gen))
    kwargs = dict(rewards=rewards, group_size=2, old_logp=old, ref_logp=ref, loss_type=loss_type, temperature=0.9,
                  softcap=softcap)
    ref_in = [x.clone().requires_grad_() for x in tensors]
    ref_loss, ref_stats = fused_linear_grpo_loss_reference(*ref_in[:2], ids, mask, bias=ref_in[2] if use_bias else None,
                                                           **kwargs)
    ref_loss.backward()
    fast_in = [x.clone().requires_grad_() for x in tensors]
    fast_loss, fast_stats = fused_linear_grpo_loss_triton(*fast_in[:2], ids, mask, bias=fast_in[2] if use_bias else None,
                                                          chunk_size=chunk_size, block_v=BLOCK_V, **kwargs)
    (fast_loss * 3).backward()
    torch.testing.assert_close(fast_loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_stats.logp, ref_stats.logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_stats.kl, ref_stats.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_stats.clip_frac, ref_stats.clip_frac)
    for r, f in zip(ref_in, fast_in):
        torch.testing.assert_close(f.grad, 3 * r.grad, rtol=1e-4, atol=1e-5 * r.grad.abs().max().item())


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_fused_linear_token_logprobs_matches_reference(softcap):
    from grm_engine.kernels.linear_grpo import fused_linear_token_logprobs_triton
    from grm_engine.loss import fused_linear_token_logprobs_reference, softcap_logits

    _, ids, mask, *_ = make_inputs(16)
    gen = torch.Generator().manual_seed(16)
    hidden, weight, bias = torch.randn(B, T, 12, generator=gen), torch.randn(V, 12, generator=gen), torch.randn(V)
    want = fused_linear_token_logprobs_reference(hidden, weight, ids, bias=bias, mask=mask, temperature=1.3,
                                                 return_entropy=True, softcap=softcap)
    got = fused_linear_token_logprobs_triton(hidden, weight, ids, bias=bias, mask=mask, temperature=1.3,
                                             return_entropy=True, chunk_size=4, block_v=BLOCK_V, softcap=softcap)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    if softcap is not None:  # the cap is what a Gemma 2 forward applies: log_softmax(cap * tanh(z / cap) / T)
        logits = softcap_logits(hidden @ weight.t() + bias, softcap) / 1.3
        plain = torch.log_softmax(logits, -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0] * mask
        torch.testing.assert_close(got[0], plain, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="softcap"):
            grm_engine.loss.fused_linear_token_logprobs(hidden, weight, ids, mask=mask, softcap=0.0)
        with pytest.raises(ValueError, match="softcap"):
            grm_engine.fused_linear_grpo_loss(hidden, weight, ids, mask, advantages=torch.ones(B), softcap=float("inf"))


# ----------------------------------------------------------------------------- dispatch and errors

def test_dispatch_cpu_uses_reference_and_env_forces_triton(monkeypatch):
    import grm_engine.kernels.grpo_loss as triton_module

    logits, ids, mask, *_ , adv = make_inputs(12)
    calls = []
    real = triton_module.grpo_loss_triton
    monkeypatch.setattr(triton_module, "grpo_loss_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv("GRM_ENGINE_BACKEND", raising=False)
    want, _ = grm_engine.grpo_loss(logits[:, :-1], ids, mask, advantages=adv)
    assert calls == []
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    got, _ = grm_engine.grpo_loss(logits[:, :-1], ids, mask, advantages=adv)
    assert calls == [1]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("change, message", [
    (dict(ids=torch.zeros(B, T + 1, dtype=torch.long)), "completion_ids must have shape"),
    (dict(ids=torch.full((B, T), V, dtype=torch.long)), "outside the vocabulary"),
    (dict(ids=torch.zeros(B, T)), "integer"),
    (dict(mask=torch.ones(B, T - 1)), "mask must have shape"),
    (dict(advantages=None), "exactly one of"),
    (dict(advantages=torch.ones(B + 1)), "advantages must have shape"),
    (dict(advantages=None, rewards=torch.ones(B), group_size=3), "group_size"),
    (dict(old_logp=torch.ones(B, T, dtype=torch.long)), "old_logp must be a floating"),
    (dict(loss_type="dapo"), "loss_type"),
    (dict(logits=torch.ones(B, T, V, dtype=torch.float64)), "logits must be float32"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_arguments_name_the_argument(change, message):
    logits, ids, mask, *_ = make_inputs(13)
    args = dict(logits=logits[:, :-1], ids=ids, mask=mask, advantages=torch.ones(B))
    args.update(change)
    logits, ids, mask = args.pop("logits"), args.pop("ids"), args.pop("mask")
    with pytest.raises((ValueError, TypeError), match=message):
        grm_engine.grpo_loss(logits, ids, mask, **args)


# ----------------------------------------------------------------------------- GPU lane (pytest -m gpu)

def max_error(x, truth):
    return (x.double() - truth.double()).abs().max().item()


def relative_error(x, truth):
    return ((x.double() - truth.double()).norm() / truth.double().norm().clamp(min=1e-30)).item()


def assert_within_twice(name, ours, low_precision_reference, truth, measure=max_error, floor=1e-6):
    """The fast path's error against truth is at most 2x the PyTorch reference's own low-precision error."""
    ours_err, ref_err = measure(ours, truth), measure(low_precision_reference, truth)
    scale = truth.double().abs().max().item() if measure is max_error else 1.0
    assert ours_err <= 2 * ref_err + floor * max(scale, 1e-30), f"{name}: ours {ours_err:.3g} vs reference {ref_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [152064, 256000])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_gpu_bf16_against_fp64(vocab, loss_type):
    logits, ids, mask, old, ref, rewards, _ = make_inputs(20, batch=4, length=256, vocab=vocab, scale=2.0,
                                                          dtype=torch.bfloat16, device="cuda")
    kwargs = dict(rewards=rewards, group_size=2, old_logp=old, ref_logp=ref, temperature=0.9, loss_type=loss_type)
    results = {}
    for name, dtype in (("truth", torch.float64), ("reference", torch.bfloat16)):
        leaf = logits[:, :-1].to(dtype).requires_grad_()
        loss, stats = grpo_loss_reference(leaf, ids, mask, **kwargs)
        results[name] = (loss.detach(), stats.logp, torch.autograd.grad(loss, leaf)[0])
    for inplace in (True, False):
        buffer = logits.clone().requires_grad_()
        view = buffer[:, :-1]  # a strided non-leaf view, as a model's logits[:, :-1] is
        loss, stats = grm_engine.grpo_loss(view, ids, mask, inplace=inplace, **kwargs)
        results[inplace] = (loss.detach(), stats.logp, torch.autograd.grad(loss, view)[0])
    for index, name in enumerate(("loss", "logp", "grad")):
        assert_within_twice(name, results[True][index], results["reference"][index], results["truth"][index])
        assert torch.equal(results[True][index], results[False][index]), f"{name}: in-place and not differ"


@pytest.mark.gpu
def test_gpu_many_rows_and_largest_vocab():
    for batch, length, vocab in ((256, 1024, 64), (2, 4, 262144)):  # 262,144 rows; a 262,144 vocabulary
        logits, ids, mask, old, ref, _, adv = make_inputs(21, batch=batch, length=length, vocab=vocab, device="cuda")
        want_loss, want_stats = grpo_loss_reference(logits[:, :-1], ids, mask, advantages=adv, old_logp=old,
                                                    ref_logp=ref)
        got_loss, got_stats = grm_engine.grpo_loss(logits[:, :-1], ids, mask, advantages=adv, old_logp=old,
                                                   ref_logp=ref)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_stats.logp, want_stats.logp, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_token_logprobs_bf16():
    logits, ids, mask, *_ = make_inputs(22, batch=4, length=256, vocab=152064, dtype=torch.bfloat16, device="cuda")
    truth = token_logprobs_reference(logits[:, :-1].double(), ids, mask=mask, return_entropy=True)
    reference = token_logprobs_reference(logits[:, :-1], ids, mask=mask, return_entropy=True)
    ours = grm_engine.token_logprobs(logits[:, :-1], ids, mask=mask, return_entropy=True)
    for name, o, r, t in zip(("logp", "entropy"), ours, reference, truth):
        assert_within_twice(name, o, r, t)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [512, None])
def test_gpu_fused_linear_bf16(chunk_size):
    _, ids, mask, old, ref, rewards, _ = make_inputs(23, batch=4, length=512, vocab=32768, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(23)
    hidden = torch.randn(4, 512, 1024, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(32768, 1024, device="cuda", generator=gen) * 0.05).bfloat16()
    kwargs = dict(rewards=rewards, group_size=2, old_logp=old, ref_logp=ref, temperature=0.9)
    results = {}
    for name, dtype in (("truth", torch.float64), ("reference", torch.bfloat16), ("ours", torch.bfloat16)):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        if name == "ours":
            loss, stats = grm_engine.fused_linear_grpo_loss(h, w, ids, mask, chunk_size=chunk_size, **kwargs)
        else:
            loss, stats = fused_linear_grpo_loss_reference(h, w, ids, mask, **kwargs)
        results[name] = (loss.detach(), stats.logp, *torch.autograd.grad(loss, (h, w)))
    for index, name in enumerate(("loss", "logp", "grad_hidden", "grad_weight")):
        assert_within_twice(name, results["ours"][index], results["reference"][index], results["truth"][index],
                            measure=relative_error)
