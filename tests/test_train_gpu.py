"""Training on the GPU (pytest -m gpu): the fused SFT loss in bf16 at V = 152k against fp32, and the GRPO
decoder reading the live DeepSpeed policy (ZeRO-2 moves parameters into flat buffers inside initialize; the
decoder must be bound after it and follow every optimizer step and checkpoint load)."""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.xfail(strict=True, reason="measured on the H200 (2026-11-30): grad_weight relative error 3.6e-3 vs "
                   "PyTorch bf16's 1.6e-4 at near-uniform softmax (random lm_head, V=152k); value and grad_hidden "
                   "within 2x. Open: find where the fused-linear weight gradient loses precision")
def test_fused_completion_nll_matches_fp32_reference():
    from grm_engine.train.losses import completion_nll_sum, plain_completion_nll_sum

    torch.manual_seed(0)
    B, T, H, V = 2, 384, 896, 152064
    hidden = (torch.randn(B, T, H, device="cuda") * 0.5).bfloat16().requires_grad_()
    head = torch.nn.Linear(H, V, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        head.weight.normal_(0, 0.02)
    ids = torch.randint(0, V, (B, T), device="cuda")
    mask = torch.rand(B, T, device="cuda") < 0.7
    loss, nll = completion_nll_sum(head, hidden, ids, mask)
    loss.backward()
    got = (hidden.grad.float(), head.weight.grad.float())

    h32 = hidden.detach().float().requires_grad_()
    w32 = head.weight.detach().float().requires_grad_()
    ref = plain_completion_nll_sum(h32 @ w32.t(), ids, mask)
    ref.backward()
    h16 = hidden.detach().clone().requires_grad_()
    w16 = head.weight.detach().clone().requires_grad_()
    low = plain_completion_nll_sum(h16 @ w16.t(), ids, mask)  # PyTorch in bf16: the error we may be at most 2x of
    low.backward()
    def relative(x, truth):  # the loss tests' measure for fused-linear gradients (tests/test_loss.py)
        return ((x.double() - truth.double()).norm() / truth.double().norm()).item()

    ours_err, torch_err = abs(float(nll) - float(ref)), abs(float(low) - float(ref))
    # a sum of ~540 token NLLs: per-token rounding partly cancels, so allow 2x PyTorch's error plus 1e-4 relative
    assert ours_err <= 2 * torch_err + 1e-4 * abs(float(ref)), (float(nll), float(low), float(ref))
    for name, ours, exact, torch_low in zip(("grad_hidden", "grad_weight"), got, (h32.grad, w32.grad),
                                            (h16.grad.float(), w16.grad.float())):
        err, base = relative(ours, exact), relative(torch_low, exact)
        assert err <= 2 * base + 1e-6, (name, err, base)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()


@cuda
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_grpo_decoder_follows_the_deepspeed_policy(tmp_path, stage):
    pytest.importorskip("deepspeed")
    import transformers as tf

    from grm_engine import SamplingParams
    from grm_engine.demo import build_tokenizer, tiny_config
    from grm_engine.train.config import GRPOConfig
    from grm_engine.train.engine import Engine
    from grm_engine.train.grpo import LiveDecoder

    tokenizer = build_tokenizer(str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(tiny_config("qwen2", tokenizer)).cuda().bfloat16()
    config = GRPOConfig(model=str(tmp_path), data="x", output_dir=str(tmp_path), deepspeed=stage, device="cuda",
                        dtype="bfloat16", learning_rate=1e-2, per_device_train_batch_size=1, num_generations=2,
                        max_completion_length=8, lr_scheduler_type="constant")
    engine = Engine(model, config, total_steps=10)
    live = LiveDecoder(engine, tokenizer, config, max_prompt_tokens=64)
    prompt = tokenizer("the a of to and is in it")["input_ids"]

    def decoder_logprobs():
        def run(decoder):
            out = decoder.generate([prompt], SamplingParams(n=1, temperature=0.0, max_tokens=6, logprobs=True,
                                                             ignore_eos=True), use_tqdm=False)[0].outputs[0]
            return out.token_ids, torch.tensor(out.logprobs)
        if engine.zero_stage == 3:
            with engine.gathered_parameters():
                return run(live._build())
        fingerprint = live._fingerprint()
        if live.decoder is None or fingerprint != live.fingerprint:
            live.decoder, live.fingerprint = live._build(), fingerprint
        return run(live.decoder)

    def module_logprobs(tokens):
        ids = torch.tensor([prompt + tokens], device="cuda")
        with torch.no_grad():
            logits = engine.module(ids).logits[0, len(prompt) - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens, device="cuda")[:, None]).squeeze(-1).cpu()

    for step in range(3):
        tokens, logprobs = decoder_logprobs()
        torch.testing.assert_close(logprobs, module_logprobs(tokens), atol=0.05, rtol=0.05,
                                   msg=f"{stage}: decoder vs policy after {step} optimizer steps")
        ids = torch.tensor([prompt + tokens], device="cuda")
        loss = engine.module(ids, labels=ids).loss
        engine.backward(loss, last=True)
        engine.step()
