"""GRPO loss inputs (issue 16, fault 5): masked positions never reach the math, so Inf/NaN there leaves the loss
AND the gradients equal to a clean call's; NaN/Inf in advantages, rewards, old/ref log-probs (at completion
positions) or beta is a ValueError naming the tensor, on the reference path and on the Triton path (run here
under TRITON_INTERPRET=1; there the check is a flag read after the kernels are queued, and a failed in-place call
writes no gradient)."""
import pytest
import torch

import grm_engine
from grm_engine.loss import fused_linear_token_logprobs
from test_loss import B, BLOCK_V, T, V, make_inputs

H = 8


def inputs(seed=40):
    logits, ids, mask, old, ref, rewards, adv = make_inputs(seed)
    ids = torch.where(mask, ids, 0)
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen)
    return logits[:, :-1].contiguous(), ids, mask, old, ref, rewards, adv, hidden, weight


def poison_masked(tensor, mask, value):
    """value at every masked position (over the last dim too for [B, T, X])."""
    m = ~mask if tensor.dim() == 2 else (~mask)[..., None].expand_as(tensor)
    return torch.where(m, torch.full_like(tensor, value), tensor)


def loss_and_grads(path, logits, ids, mask, old, ref, adv, hidden, weight):
    if path == "grpo_loss":
        leaf = logits.clone().requires_grad_()
        loss, stats = grm_engine.grpo_loss(leaf, ids, mask, advantages=adv, old_logp=old, ref_logp=ref, inplace=False)
        loss.backward()
        return loss.detach(), stats.logp, [leaf.grad]
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = grm_engine.fused_linear_grpo_loss(hidden, weight, ids, mask, advantages=adv, old_logp=old,
                                                    ref_logp=ref)
    loss.backward()
    return loss.detach(), stats.logp, [hidden.grad, weight.grad]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("path", ["grpo_loss", "fused_linear_grpo_loss"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_at_masked_positions_change_nothing(monkeypatch, backend, path, value):
    monkeypatch.setenv("GRM_ENGINE_BACKEND", backend)
    logits, ids, mask, old, ref, _, adv, hidden, weight = inputs()
    adv_tokens = adv[:, None].expand(B, T).clone()  # per-token advantages, poisoned where masked
    clean = loss_and_grads(path, logits, ids, mask, old, ref, adv_tokens, hidden, weight)
    poisoned = loss_and_grads(path, poison_masked(logits, mask, value), ids, mask, poison_masked(old, mask, value),
                              poison_masked(ref, mask, value), poison_masked(adv_tokens, mask, value),
                              poison_masked(hidden, mask, value), weight)
    for got, want in zip([poisoned[0], poisoned[1], *poisoned[2]], [clean[0], clean[1], *clean[2]]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_token_logprobs_ignore_masked_logits(monkeypatch, backend):
    monkeypatch.setenv("GRM_ENGINE_BACKEND", backend)
    logits, ids, mask, *_, hidden, weight = inputs(41)
    want = grm_engine.token_logprobs(logits, ids, mask=mask, return_entropy=True)
    got = grm_engine.token_logprobs(poison_masked(logits, mask, float("nan")), ids, mask=mask, return_entropy=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    want = fused_linear_token_logprobs(hidden, weight, ids, mask=mask)
    got = fused_linear_token_logprobs(poison_masked(hidden, mask, float("nan")), weight, ids, mask=mask)
    torch.testing.assert_close(got, want)


def call(path, logits, ids, mask, hidden, weight, **options):
    if path == "grpo_loss":
        return grm_engine.grpo_loss(logits.clone(), ids, mask, inplace=False, **options)
    return grm_engine.fused_linear_grpo_loss(hidden, weight, ids, mask, **options)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("path", ["grpo_loss", "fused_linear_grpo_loss"])
@pytest.mark.parametrize("name", ["advantages", "rewards", "old_logp", "ref_logp", "advantages_per_token"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_at_completion_positions_are_named(monkeypatch, backend, path, name, value):
    monkeypatch.setenv("GRM_ENGINE_BACKEND", backend)
    logits, ids, mask, old, ref, rewards, adv, hidden, weight = inputs(42)
    mask[2, 3] = True  # a completion position
    options = dict(old_logp=old.clone(), ref_logp=ref.clone())
    if name == "rewards":
        options.update(rewards=rewards.clone(), group_size=2)
        options["rewards"][2] = value
        expected = r"rewards\[2\] = (nan|inf) is not finite"
    elif name == "advantages":
        options.update(advantages=adv.clone())
        options["advantages"][2] = value
        expected = r"advantages\[2\] = (nan|inf) is not finite"
    else:
        key = "advantages" if name == "advantages_per_token" else name
        options.setdefault("advantages", adv[:, None].expand(B, T).clone() if key == "advantages" else adv)
        options[key] = options[key].clone()
        options[key][2, 3] = value
        expected = rf"{key}\[2, 3\] = (nan|inf) is not finite"
    with pytest.raises(ValueError, match=expected):
        call(path, logits, ids, mask, hidden, weight, **options)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("path", ["grpo_loss", "fused_linear_grpo_loss"])
def test_non_finite_beta_is_named(monkeypatch, backend, path):
    monkeypatch.setenv("GRM_ENGINE_BACKEND", backend)
    logits, ids, mask, old, ref, _, adv, hidden, weight = inputs(43)
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be finite"):
            call(path, logits, ids, mask, hidden, weight, advantages=adv, old_logp=old, ref_logp=ref, beta=value)


def test_failed_in_place_call_leaves_logits_untouched():
    """In place, the gradient would overwrite the logits: the non-finite flag stops the kernels like a bad id."""
    from grm_engine.kernels.grpo_loss import grpo_loss_triton

    logits, ids, mask, old, ref, _, adv, *_ = inputs(44)
    mask[2, 3], old[2, 3] = True, float("nan")
    leaf = logits.clone().requires_grad_()
    before = leaf.detach().clone()
    with pytest.raises(ValueError, match=r"old_logp\[2, 3\] = nan"):
        grpo_loss_triton(leaf, ids, mask, advantages=adv, old_logp=old, ref_logp=ref, block_v=BLOCK_V)
    assert torch.equal(leaf.detach(), before)
