"""GRPO training step (grm_engine.train.grpo) on the CPU with tiny random-init models.

The specification is a plain PyTorch restatement of the objective on unfused, unpadded logits (one row at a
time through transformers' own forward): per token logp = log_softmax(logits / T)[id], ratio 1 with the
gradient of exp(logp - logp.detach()) (num_iterations = 1), k3 KL against the reference, the loss type's
reduction over the GLOBAL batch. The fast path (left-padded micro-batches sized by tokens, fused lm_head loss,
per-micro-batch shares of the global counts) must give the same loss gradient.
"""
import json
import os

import pytest
import torch

from grm_engine.demo import tiny_config
from grm_engine.train.config import load_config
from grm_engine.train.engine import Engine
from grm_engine.train.grpo import Chunk, accumulate_gradients, make_chunk
from grm_engine.train.rollout import Rollouts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from grm_engine.demo import build_tokenizer

    return build_tokenizer(str(tmp_path_factory.mktemp("tok")))


def tiny_model(tokenizer, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config("qwen2", tokenizer)
    config.hidden_size, config.intermediate_size = 32, 64
    return tf.Qwen2ForCausalLM(config).float()


def make_rollouts(rewards, prompt_lengths, completion_lengths, vocab, seed=0):
    """Hand-made rollouts: random prompt and completion ids of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    N = len(rewards)
    prompts = [torch.randint(3, vocab, (p,), generator=g).tolist() for p in prompt_lengths]
    width = max(completion_lengths)
    ids = torch.zeros(N, width, dtype=torch.long)
    mask = torch.zeros(N, width, dtype=torch.bool)
    for i, c in enumerate(completion_lengths):
        ids[i, :c] = torch.randint(3, vocab, (c,), generator=g)
        mask[i, :c] = True
    rewards = torch.tensor(rewards, dtype=torch.float32)
    return Rollouts(example_index=torch.arange(N), permutation=torch.zeros(N, 2, dtype=torch.long), prompt_ids=prompts,
                    completion_ids=ids, completion_mask=mask, completion_logprobs=None,
                    scores=torch.zeros(N, 2), status=torch.zeros(N, dtype=torch.int8), correct=rewards > 0,
                    rewards=rewards, finish_reasons=["length"] * N, seconds=0.0, generated_tokens=int(mask.sum()))


def reference_loss(policy, reference, rollouts: Rollouts, advantages, config):
    """The objective, row by row on full logits (the specification)."""
    per_row, tokens_total, sum_total = [], 0, 0.0
    terms = []
    for i, prompt in enumerate(rollouts.prompt_ids):
        length = int(rollouts.completion_mask[i].sum())
        completion = rollouts.completion_ids[i, :length]
        input_ids = torch.tensor(prompt + completion.tolist())[None]
        logits = policy(input_ids).logits[0, len(prompt) - 1:len(prompt) - 1 + length].float() / config.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, completion[:, None]).squeeze(-1)  # [length]
        ratio = torch.exp(logp - logp.detach())
        loss_tok = -ratio * advantages[i]
        if reference is not None and config.beta:
            with torch.no_grad():
                ref_logits = reference(input_ids).logits[0, len(prompt) - 1:len(prompt) - 1 + length].float()
                ref = torch.log_softmax(ref_logits / config.temperature, -1).gather(-1, completion[:, None]).squeeze(-1)
            loss_tok = loss_tok + config.beta * (torch.exp(ref - logp) - (ref - logp) - 1)
        terms.append(loss_tok)
        per_row.append(loss_tok.sum() / length)
        tokens_total += length
    if config.loss_type == "grpo":
        return torch.stack(per_row).mean()
    if config.loss_type == "bnpo":
        return torch.cat(terms).sum() / tokens_total
    return torch.cat(terms).sum() / (len(terms) * config.max_completion_length)


def grpo_config(tmp_path, **overrides):
    base = tmp_path / "m"
    base.mkdir(exist_ok=True)
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    values = dict(model=str(base), data=str(data), output_dir=str(tmp_path / "out"), learning_rate=1e-3,
                  num_generations=4, per_device_train_batch_size=2, device="cpu")
    values.update(overrides)
    return load_config("grpo", None, values)


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def check_step_gradient(config, build, tokenizer) -> dict:
    """accumulate_gradients' gradient on hand-made rollouts == the row-by-row objective's (policy build(seed=1),
    reference build(seed=2)); -> the step's sums."""
    policy = build(tokenizer, seed=1)
    reference = build(tokenizer, seed=2).eval().requires_grad_(False)
    rollouts = make_rollouts([1, -1, -1, 1, 1, 1, -1, 1], [7, 7, 5, 6, 9, 9, 9, 4], [3, 9, 1, 5, 2, 6, 4, 8],
                             len(tokenizer))
    chunk = make_chunk(rollouts, config)
    expected_policy = build(tokenizer, seed=1)
    reference_loss(expected_policy, reference, rollouts, chunk.advantages, config).backward()
    expected = grads_of(expected_policy)

    engine = Engine(policy, config, total_steps=1)
    timings = {"reference_s": 0.0, "policy_s": 0.0}
    sums = accumulate_gradients(engine, reference, [chunk], config, torch.device("cpu"), 0, timings)
    got = grads_of(engine.module)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=2e-4, atol=2e-6, msg=f"gradient of {name}")
    return sums


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("budget", [10_000, 40])  # one micro-batch, or several small ones
def test_step_gradient_equals_reference(tmp_path, tokenizer, loss_type, budget):
    config = grpo_config(tmp_path, loss_type=loss_type, beta=0.08, temperature=0.7, max_tokens_per_micro_batch=budget,
                         max_completion_length=9)
    sums = check_step_gradient(config, tiny_model, tokenizer)
    assert sums["rows"] == 8


def tiny_gemma2(tokenizer, seed=0):
    """Gemma 2 with its final soft-capping small enough to change every log-prob, sliding window 8 (shorter than
    some rows: the GRPO batches' 2-D masks let transformers apply it), eager attention as transformers requires."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), query_pre_attn_scalar=8,
                             sliding_window=8, final_logit_softcapping=0.5, attn_implementation="eager",
                             pad_token_id=tokenizer.pad_token_id)
    return tf.Gemma2ForCausalLM(config).float()


def test_step_gradient_equals_reference_gemma2(tmp_path, tokenizer):
    """The same check on Gemma 2: the fused loss applies the final soft-capping the model's logits carry (policy and
    reference log-probs), and left-padded micro-batches keep its sliding window."""
    config = grpo_config(tmp_path, loss_type="grpo", beta=0.5, temperature=0.7, max_tokens_per_micro_batch=40,
                         max_completion_length=9)
    check_step_gradient(config, tiny_gemma2, tokenizer)


def test_two_chunks_equal_one_batch(tmp_path, tokenizer):
    """Gradient accumulation over rollout chunks: two chunks of 4 rows give the one-batch gradient."""
    config = grpo_config(tmp_path, beta=0.08, max_completion_length=9)
    rollouts = make_rollouts([1, -1, -1, 1, 1, 1, -1, 1], [7, 7, 5, 6, 9, 9, 9, 4], [3, 9, 1, 5, 2, 6, 4, 8],
                             len(tokenizer))
    reference = tiny_model(tokenizer, seed=2).eval().requires_grad_(False)

    def run(chunks):
        engine = Engine(tiny_model(tokenizer, seed=1), config, total_steps=1)
        accumulate_gradients(engine, reference, chunks, config, torch.device("cpu"), 0,
                             {"reference_s": 0.0, "policy_s": 0.0})
        return grads_of(engine.module)

    whole = run([make_chunk(rollouts, config)])
    halves = []
    for rows in (slice(0, 4), slice(4, 8)):
        part = make_rollouts([1, -1, -1, 1, 1, 1, -1, 1][rows], [7, 7, 5, 6, 9, 9, 9, 4][rows],
                             [3, 9, 1, 5, 2, 6, 4, 8][rows], len(tokenizer))
        part.prompt_ids = rollouts.prompt_ids[rows]
        part.completion_ids = rollouts.completion_ids[rows]
        part.completion_mask = rollouts.completion_mask[rows]
        halves.append(Chunk(part, make_chunk(rollouts, config).advantages[rows], list(range(4)),
                            part.completion_mask.sum(1).tolist(), torch.zeros(1, dtype=torch.bool)))
    split = run(halves)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=2e-4, atol=2e-6, msg=name)


@pytest.mark.parametrize("skip", [False, True])
def test_zero_advantage_groups_give_zero_gradient(tmp_path, tokenizer, skip):
    config = grpo_config(tmp_path, beta=0.0, reference="none", skip_zero_advantage=skip, max_completion_length=9)
    rollouts = make_rollouts([1, 1, 1, 1, -1, -1, -1, -1], [5] * 8, [4] * 8, len(tokenizer))
    chunk = make_chunk(rollouts, config)
    assert chunk.zero_groups.tolist() == [True, True]
    assert chunk.rows == ([] if skip else list(range(8)))
    engine = Engine(tiny_model(tokenizer), config, total_steps=1)
    accumulate_gradients(engine, None, [chunk], config, torch.device("cpu"), 0, {"reference_s": 0.0, "policy_s": 0.0})
    grads = grads_of(engine.module)
    assert grads, "the padding micro-batch still runs a backward (every rank steps the same way)"
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())
