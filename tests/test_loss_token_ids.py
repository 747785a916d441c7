"""Completion ids outside the vocabulary: every path raises the same error naming the first bad position; the
Triton kernels never read out of bounds (the gather is clamped) and write no gradient on a failed call; ids at
masked positions are never looked at. Also the GPU-side prologue (per-sequence counts, the flag) and the
device-side rescale of the gradient. CPU lane under TRITON_INTERPRET=1; the GPU lane checks there is no host
sync in the loss and log-prob calls (torch.cuda.set_sync_debug_mode)."""
import pytest
import torch

import grm_engine
from grm_engine.loss import fused_linear_token_logprobs, grpo_loss_reference, token_logprobs_reference
from test_loss import B, BLOCK_V, T, V, make_inputs

BAD_MESSAGE = r"completion_ids\[2, 3\] = 55 is outside the vocabulary \[0, 50\)"


def with_bad_ids(ids, mask):
    """ids with V + 5 at [2, 3] (first in row-major order) and -7 at [3, 1], both completion tokens."""
    ids, mask = ids.clone(), mask.clone()
    ids[2, 3], ids[3, 1] = V + 5, -7
    mask[2, 3] = mask[3, 1] = True
    return ids, mask


def call_path(path, logits, ids, mask, adv):
    hidden, weight = torch.randn(B, T, 8), torch.randn(V, 8)
    if path == "grpo_loss":
        return grm_engine.grpo_loss(logits, ids, mask, advantages=adv)
    if path == "token_logprobs":
        return grm_engine.token_logprobs(logits, ids, mask=mask)
    if path == "fused_linear_grpo_loss":
        return grm_engine.fused_linear_grpo_loss(hidden, weight, ids, mask, advantages=adv)
    return fused_linear_token_logprobs(hidden, weight, ids, mask=mask)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("path", ["grpo_loss", "token_logprobs", "fused_linear_grpo_loss", "fused_linear_token_logprobs"])
def test_bad_id_raises_on_every_path(monkeypatch, backend, path):
    monkeypatch.setenv("GRM_ENGINE_BACKEND", backend)
    logits, ids, mask, *_, adv = make_inputs(30)
    ids, mask = with_bad_ids(ids, mask)
    with pytest.raises(ValueError, match=BAD_MESSAGE):
        call_path(path, logits[:, :-1], ids, mask, adv)


@pytest.mark.parametrize("fused_grad", [False, True])
def test_failed_call_leaves_logits_untouched(fused_grad):
    """In place, the gradient would overwrite the logits: the kernels read the flag and write nothing."""
    from grm_engine.kernels.grpo_loss import grpo_loss_triton

    logits, ids, mask, old, ref, _, adv = make_inputs(31)
    ids, mask = with_bad_ids(ids, mask)
    leaf = logits[:, :-1].clone().requires_grad_()
    before = leaf.detach().clone()
    with pytest.raises(ValueError, match=BAD_MESSAGE):
        grpo_loss_triton(leaf, ids, mask, advantages=adv, old_logp=old, ref_logp=ref, block_v=BLOCK_V,
                         fused_grad=fused_grad)
    assert torch.equal(leaf.detach(), before)


def test_bad_ids_at_masked_positions_are_never_read():
    """ids far outside the vocabulary where the mask is 0: no error, and the same results as the reference."""
    from grm_engine.kernels.grpo_loss import grpo_loss_triton, token_logprobs_triton

    logits, ids, mask, old, ref, _, adv = make_inputs(32)
    logits = logits[:, :-1]
    ids = torch.where(mask, ids, torch.tensor([V + 5, -7, 2**40]).repeat(B * T)[: B * T].view(B, T))
    want_leaf, got_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    want, want_stats = grpo_loss_reference(want_leaf, ids, mask, advantages=adv, old_logp=old, ref_logp=ref)
    got, got_stats = grpo_loss_triton(got_leaf, ids, mask, advantages=adv, old_logp=old, ref_logp=ref,
                                      block_v=BLOCK_V, inplace=False)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_stats.logp, want_stats.logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got, got_leaf)[0], torch.autograd.grad(want, want_leaf)[0],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_logprobs_triton(logits, ids, mask=mask, block_v=BLOCK_V),
                               token_logprobs_reference(logits, ids, mask=mask), rtol=1e-5, atol=1e-5)


def test_kernel_gather_is_clamped_and_flag_stops_the_gradient():
    """Called below the checks: a bad id at a completion position reads id 0 or V - 1 (inside the row), the
    prologue sets the flag, and the gradient kernel then writes nothing."""
    from grm_engine.kernels.grpo_loss import check_sequences, launch_rows

    logits, ids, mask, *_, adv = make_inputs(33)
    logits = logits[:, :-1].contiguous()
    ids, mask = with_bad_ids(ids, mask)
    counts, flag = check_sequences(ids, mask, V)
    assert flag.item() == 1
    grad = torch.full_like(logits, 5.0)
    out = launch_rows(logits, ids, flag, mask=mask, advantages=adv, grad=grad, block_v=BLOCK_V)
    want = token_logprobs_reference(logits, ids.clamp(0, V - 1), mask=mask)
    torch.testing.assert_close(out["logp"], want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out["stats"]).all() and torch.all(grad == 5.0)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "int", "none"])
def test_check_sequences_counts_and_flag(mask_kind):
    from grm_engine.kernels.grpo_loss import check_sequences

    _, ids, mask, *_ = make_inputs(34, length=37)  # T not a power of two: a partial block
    ids = ids.clamp(min=0)
    mask = {"bool": mask, "float": mask.float(), "int": mask.int(), "none": None}[mask_kind]
    counts, flag = check_sequences(ids.t().contiguous().t(), mask, V)  # transposed strides
    want = torch.full((B,), 37) if mask is None else (mask != 0).sum(1)
    assert torch.equal(counts.long(), want) and flag.item() == 0
    ids[0, 36] = V
    assert check_sequences(ids, mask, V)[1].item() == (mask is None or bool(mask[0, 36]))


@pytest.mark.parametrize("seed", range(4))
def test_check_sequences_nonfinite_flag_matches_reference(seed):
    """The prologue's NaN/Inf bit == grm_engine.loss.nonfinite_flag (the tensor-op rule it replaces on the Triton
    path): old/ref log-probs count at completion positions only, an advantage only when its sequence has completion
    tokens, a reward always; the id bit stays separate."""
    from grm_engine.kernels.grpo_loss import check_sequences
    from grm_engine.loss import NONFINITE_FLAG, nonfinite_flag

    gen = torch.Generator().manual_seed(seed)
    _, ids, mask, *_ = make_inputs(40 + seed, length=37)
    ids = ids.clamp(min=0)
    mask[1] = False  # a sequence without completion tokens
    cases = 0
    for trial in range(12):
        tensors = dict(old_logp=-torch.rand(B, 37, generator=gen), ref_logp=-torch.rand(B, 37, generator=gen),
                       advantages=torch.randn(B, generator=gen), rewards=torch.randn(B, generator=gen))
        name = ("old_logp", "ref_logp", "advantages", "rewards")[trial % 4]
        if trial >= 4:  # one poisoned entry, masked or not, on an empty sequence or not
            index = tuple(int(torch.randint(0, n, (1,), generator=gen)) for n in tensors[name].shape)
            tensors[name][index] = (float("nan"), float("inf"), -float("inf"))[trial % 3]
        if trial % 2:
            tensors.pop("rewards")
        else:
            tensors.pop("advantages")
        want = int(nonfinite_flag(mask, **tensors).item())
        got = int(check_sequences(ids, mask, V, **tensors)[1].item())
        assert got == want, (trial, name)
        cases += want == NONFINITE_FLAG
    assert 0 < cases < 12  # both outcomes were tried


@pytest.mark.parametrize("scale", [1.0, 0.0, -2.5, float("inf")])
def test_scale_rows_matches_multiply(scale):
    from grm_engine.kernels.grpo_loss import scale_rows

    grad = torch.randn(B, T + 1, V)[:, :-1]  # a strided view
    want = grad * scale
    scale_rows(grad, torch.tensor(scale))
    torch.testing.assert_close(grad, want, equal_nan=True)


# ----------------------------------------------------------------------------- GPU lane (pytest -m gpu)

@pytest.mark.gpu
def test_gpu_bad_id_raises_without_a_fault():
    """An id of 2**40 at a completion position: unclamped it would fault; clamped, the call raises the error,
    the device stays usable, and the in-place logits are untouched."""
    logits, ids, mask, old, ref, _, adv = make_inputs(35, batch=4, length=64, vocab=32768, dtype=torch.bfloat16,
                                                      device="cuda")
    buffer = logits.clone().requires_grad_()
    view = buffer[:, :-1]  # in place: a gradient written by a failed call would land here
    bad = ids.clone()
    bad[2, 3], mask[2, 3] = 2**40, True
    with pytest.raises(ValueError, match=r"completion_ids\[2, 3\] = 1099511627776 is outside"):
        grm_engine.grpo_loss(view, bad, mask, advantages=adv, old_logp=old, ref_logp=ref)
    with pytest.raises(ValueError, match=r"completion_ids\[2, 3\] = 1099511627776 is outside"):
        grm_engine.token_logprobs(view, bad, mask=mask)
    torch.cuda.synchronize()
    assert torch.equal(buffer.detach(), logits)
    loss, _ = grm_engine.grpo_loss(view, ids.clamp(min=0), mask, advantages=adv, old_logp=old, ref_logp=ref)
    assert torch.isfinite(torch.autograd.grad(loss, view)[0]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_gpu_loss_and_logprobs_never_sync_the_host(loss_type):
    """The whole forward + backward and token_logprobs queue their work with no host sync (the flag is read
    through an event, which sync debug mode does not count); an upstream gradient != 1 is applied on the device."""
    logits, ids, mask, old, ref, _, adv = make_inputs(36, batch=4, length=64, vocab=32768, dtype=torch.bfloat16,
                                                      device="cuda")
    ids = ids.clamp(min=0)
    kwargs = dict(advantages=adv, old_logp=old, ref_logp=ref, loss_type=loss_type)

    def step(scale):
        view = logits.clone().requires_grad_()[:, :-1]
        loss, stats = grm_engine.grpo_loss(view, ids, mask, **kwargs)
        grad = torch.autograd.grad(loss * scale, view)[0]
        return loss, stats, grad, grm_engine.token_logprobs(logits[:, :-1], ids, mask=mask)

    step(1.0)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats, grad, logp = step(-3.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    leaf = logits[:, :-1].float().requires_grad_()
    want, want_stats = grpo_loss_reference(leaf, ids, mask, **kwargs)
    want_grad = torch.autograd.grad(want * -3.0, leaf)[0]
    torch.testing.assert_close(loss, want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.kl, want_stats.kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logp, want_stats.logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.float(), want_grad, rtol=2e-2, atol=1e-2 * want_grad.abs().max().item())
