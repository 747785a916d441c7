"""Shared pieces of the decoder's GPU tests (tests/test_decode_gpu.py, tests/test_decode_deepseek_v2.py): the bf16
first-step-logits and greedy check against transformers, and the prompts it runs on."""
from __future__ import annotations

import torch

from grm_engine.decode import Decoder, SamplingParams


def medium_prompts() -> list[list[int]]:
    """Three prompts of 100, 517 and 1,300 random token ids in 4..4095 (a short, a middling, a several-block one)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, 4096, (n,), generator=g).tolist() for n in (100, 517, 1300)]


def check_bf16_first_step_and_greedy(model32, model16, prompts, monkeypatch, *, label: str = ""):
    """Decode `prompts` greedily (16 tokens, EOS ignored) with our decoder on model16 (the bf16 copy of model32) and
    check: the first step's logits are within 2x transformers' own bf16 error of fp32 (+1e-3), and wherever a greedy
    token is not fp32's best, the fp32 logits call it a near tie (within 4x that error). Returns the outputs.
    `label` starts every failure message (e.g. the model family)."""
    import grm_engine.decode.decoder as decoder_module

    captured, sample = [], decoder_module.sample

    def capture(logits, *args, **kwargs):
        if not captured:
            captured.append(logits.clone())
        return sample(logits, *args, **kwargs)

    decoder = Decoder.from_pretrained(model16, num_kv_blocks=2048, block_size=16)  # (its warm-up call samples too)
    monkeypatch.setattr(decoder_module, "sample", capture)
    outputs = decoder.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    ours = captured[0]  # [len(prompts), V]: the first step samples every prompt's first token
    prefix = f"{label} " if label else ""
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            exact = model32(ids).logits[0, -1].double()
            hf_error = (model16(ids).logits[0, -1].double() - exact).abs().max().item()
        our_error = (ours[i].double() - exact).abs().max().item()
        assert our_error <= 2 * hf_error + 1e-3, \
            f"{prefix}prompt {i}: error {our_error:.4g} vs transformers bf16 {hf_error:.4g}"
        tokens = outputs[i].outputs[0].token_ids
        with torch.no_grad():
            forced = model32(torch.tensor([prompt + tokens], device="cuda")).logits[0, len(prompt) - 1:-1].float()
        for step, token in enumerate(tokens):
            margin = (forced[step].max() - forced[step, token]).item()
            assert margin <= 4 * hf_error + 1e-3, \
                f"{prefix}prompt {i} step {step}: token {token} is {margin:.3g} below the best"
    return outputs
