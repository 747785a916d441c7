"""The GRPO loop (grm_engine.train.grpo: run_grpo, prepare_grpo, LiveDecoder) on the CPU with a tiny model.

The model of every test: the demo task's tokenizer (grm_engine/demo_task.py: a build_prompt prompt is ~50 tokens,
"\\boxed{9, 2}" is 5) and a random-init 2-layer Llama of hidden size 64, warm-started by `train sft` on each prompt
answered both ways, "\\boxed{9, 2}" and "\\boxed{2, 9}": it samples a parseable verdict ~95% of the time at
temperature 1 and says either about half the time, so the rule reward varies within a group and GRPO has a
gradient from the first step.

1. kill-and-resume: a `train grpo` run SIGKILLed after a checkpoint and rerun continues the uninterrupted run bit
   for bit (rewards, losses, grad norms, sampled completions, final weights);
2. the rollouts after an optimizer step come from the new weights (greedy tokens = transformers' argmax with
   the updated weights), and the prefix cache never serves KV computed with the old ones;
3. a real learning test: with the responses never shuffled and the right one always shown first, the output
   "\\boxed{9, 2}" is always right, and GRPO raises the mean reward from ~0.2 to ~0.8 in 20 steps.
"""
import copy
import json

import pytest
import torch

from grm_engine.demo_task import build_task_tokenizer, make_task_examples, write_examples_jsonl
from grm_engine.protocol import build_prompt
from grm_engine.train import train
from train_helpers import few_threads, kill_during_step_4_then_rerun, load_weights, read_metrics  # noqa: F401

VERDICTS = ("\\boxed{9, 2}", "\\boxed{2, 9}")
QUIET = dict(report_plot=False)


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory):
    """The SFT warm start (see the module docstring): 32 prompts x both verdicts, 120 steps (~6 s)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("grpo_loop_models")
    base = str(root / "base")
    tokenizer = build_task_tokenizer(base)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(base)
    data = root / "sft.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for example in make_task_examples(32, seed=1):
            prompt = build_prompt(example.query, example.responses)
            for verdict in VERDICTS:
                f.write(json.dumps({"prompt": prompt, "completion": verdict}) + "\n")
    out = root / "sft"
    result = train("sft", dict(model=base, data=str(data), output_dir=str(out), max_steps=120,
                               per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
                               logging_steps=10, save_steps=0, packing=False, seed=0, **QUIET), log=lambda *a: None)
    # both verdicts equally likely: the floor is ln 2 over the 6 completion tokens (5 + EOS), ~0.116
    assert result.metrics["loss"] < 0.2, read_metrics(out)
    return str(out / "final")


def shown_best(count: int, seed: int, best: int = 0):
    """Demo-task examples with the right reversal shown at position `best`: with shuffle = false the verdict
    "\\boxed{9, 2}" is always right (best 0) or always wrong (best 1), whatever the prompt."""
    examples = make_task_examples(count, seed=seed)
    for example in examples:
        if example.best != best:
            example.responses, example.best = example.responses[::-1], best
    return examples


# ---------------------------------------------------------------- 1. kill and resume
STEPS, SAVE = 6, 2
# every number a step logs that is a function of the weights and the seed (timings are not)
SAME_KEYS = ("reward_mean", "reward_std", "accuracy", "loss", "kl", "clip_frac", "grad_norm", "lr",
             "completion_length_mean", "parse_failure_rate", "zero_advantage_frac", "generated_tokens")


def resume_settings(model, data, output_dir) -> dict:
    """The paper's protocol (shuffled orders, beta 0.08 against a frozen reference copy), 2 chunks per step."""
    return dict(model=model, data=data, output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE,
                save_total_limit=3, logging_steps=1, log_completions_steps=1, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, num_generations=4, learning_rate=1e-3, beta=0.08, temperature=1.0,
                max_completion_length=8, seed=5, device="cpu", **QUIET)


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    return write_examples_jsonl(tmp_path_factory.mktemp("grpo_data") / "examples.jsonl",
                                make_task_examples(16, seed=3))


def completions_by_step(output_dir) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    with open(output_dir / "completions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out.setdefault(row.pop("step"), []).append(row)
    return out


def test_sigkill_then_rerun_continues_bit_for_bit(warm_model, resume_data, tmp_path):
    """A run killed after checkpoint k and rerun with the same command logs steps k+1..n exactly as the
    uninterrupted run does. Rollouts are keyed by (seed, step), so equal rewards at step k+1 mean the first
    rollout after the resume sampled from the checkpoint's weights (any other weights give other samples), and
    equal losses and grad norms mean the reference log-probs and the optimizer state were restored with them."""
    peer = tmp_path / "uninterrupted"
    train("grpo", resume_settings(warm_model, resume_data, peer), log=lambda *a: None)

    out = tmp_path / "run"
    kill_during_step_4_then_rerun("grpo", resume_settings(warm_model, resume_data, out))

    got = {r["step"]: r for r in read_metrics(out)}
    want = {r["step"]: r for r in read_metrics(peer)}
    assert len(got) == len(read_metrics(out)), "metrics.jsonl holds a step twice"
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in SAME_KEYS:
            assert got[step][key] == want[step][key], f"step {step} {key}: {got[step][key]} != {want[step][key]}"
    # the test has teeth: the run learns something (weights move, so a resume from the wrong weights would show)
    assert len({want[s]["grad_norm"] for s in want}) == STEPS and all(want[s]["grad_norm"] > 0 for s in want)
    assert len({want[s]["reward_mean"] for s in want}) > 1
    # the sampled critiques themselves, each step logged once
    assert completions_by_step(out) == completions_by_step(peer)
    final, peer_final = load_weights(out / "final"), load_weights(peer / "final")
    assert final.keys() == peer_final.keys()
    for name in final:
        assert torch.equal(final[name], peer_final[name]), name


# ---------------------------------------------------------------- 2. rollouts follow the weights
def reference_greedy(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """transformers' forward, argmax, the whole sequence every step (no KV cache); stops after EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token == eos:
                break
    return ids[len(prompt):]


def greedy_rollouts(run, step: int):
    """The live decoder's rollouts (LiveDecoder.rollouts) at temperature 0, with the decoder's log-probs of its
    tokens (log_softmax of its logits). The config validates temperature > 0 for training only."""
    import functools

    import grm_engine.train.grpo as grpo

    temperature, generate = run.config.temperature, grpo.generate_rollouts
    run.config.temperature = 0.0
    grpo.generate_rollouts = functools.partial(generate, return_logprobs=True)
    try:
        return run.live.rollouts(run.examples, run.vocab, step)
    finally:
        run.config.temperature, grpo.generate_rollouts = temperature, generate


def completions(rollouts) -> list[list[int]]:
    lengths = rollouts.completion_mask.sum(1).tolist()
    return [rollouts.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)]


def check_follows(model, rollouts, max_tokens: int, eos: int) -> None:
    """The rollouts are `model`'s: greedy tokens = transformers' argmax (no KV cache), the decoder's log-probs
    = log_softmax of transformers' logits on prompt + completion (fp32: measured 4e-7 apart; with the prompt
    blocks' KV from the weights one Adam step older, 0.11)."""
    model = model.eval()
    got = completions(rollouts)
    for i, prompt in enumerate(rollouts.prompt_ids):
        assert got[i] == reference_greedy(model, prompt, max_tokens, eos), f"row {i}"
        ids = torch.tensor([prompt + got[i]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:len(prompt) - 1 + len(got[i])]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(got[i])[:, None]).squeeze(-1)
        torch.testing.assert_close(rollouts.completion_logprobs[i, :len(got[i])], expected, rtol=0, atol=1e-4,
                                   msg=lambda m: f"row {i}: {m}")


LIVE_LR = 3e-3  # one step flips the greedy critiques of the warm start from \\boxed{9, 2} to \\boxed{2, 9}


@pytest.fixture
def live_run(warm_model, tmp_path):
    from grm_engine.train.config import load_config
    from grm_engine.train.grpo import prepare_grpo

    examples = shown_best(4, seed=11, best=1)
    data = write_examples_jsonl(tmp_path / "examples.jsonl", examples)
    config = load_config("grpo", None, dict(model=warm_model, data=data, output_dir=str(tmp_path / "out"),
                                            per_device_train_batch_size=4, num_generations=4, beta=0.0,
                                            reference="none", learning_rate=LIVE_LR, temperature=1.0, shuffle=False,
                                            max_completion_length=8, max_steps=3, seed=1, device="cpu",
                                            log_completions_steps=0, **QUIET))
    return prepare_grpo(config, examples, log=lambda *a: None)


def test_rollouts_after_a_step_come_from_the_new_weights(live_run):
    """The right response is shown second, so GRPO pushes the warm start (greedy: "\\boxed{9, 2}" everywhere)
    towards "\\boxed{2, 9}"; one Adam step at lr 3e-3 flips its greedy critiques. Two steps, each checked: the
    live decoder's rollouts are the current weights' (tokens and log-probs) before and after the step; after the
    first they differ from the pre-step policy's, which is what a decoder with a copy of the old weights returns.
    The prompts are the same at every step (shuffle = false), so the prefix cache would serve the pre-update
    rollout's prompt blocks if it were not reset: it reports no hit, and the log-probs would show stale KV."""
    run = live_run
    eos, T = run.tokenizer.eos_token_id, run.config.max_completion_length
    module = run.engine.module
    for step in range(2):
        before = copy.deepcopy(module)
        old = greedy_rollouts(run, step)  # fills the prefix cache with this policy's KV
        check_follows(before, old, T, eos)

        metrics = run.step(step)  # sampled rollouts (temperature 1), then one Adam step
        assert metrics["zero_advantage_frac"] < 1 and metrics["grad_norm"] > 0, metrics
        assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before.parameters()))
        assert run.live.decoder is not None and run.live.decoder.shares_live_weights  # built once, on the module

        new = greedy_rollouts(run, step + 1)
        assert run.live.decoder.stats.prefix_cache_hit_tokens == 0
        check_follows(module, new, T, eos)
        if step == 0:
            assert completions(new) != completions(old)
        # the second rollout after the update (the cache now holds this policy's blocks) is the same again
        again = greedy_rollouts(run, step + 1)
        assert completions(again) == completions(new)
        assert torch.equal(again.completion_logprobs, new.completion_logprobs)


def test_stale_prefix_cache_would_be_caught(live_run, monkeypatch):
    """The check above has teeth: with the reset at generate switched off, the first rollout after the update
    reuses the prompt blocks computed with the old weights; the cache reports the hits and the log-probs are
    off (the greedy tokens happen to survive: the last prompt token is always recomputed)."""
    from grm_engine.decode import Decoder

    run = live_run
    eos, T = run.tokenizer.eos_token_id, run.config.max_completion_length
    monkeypatch.setattr(Decoder, "reset_prefix_cache", lambda self: None)
    greedy_rollouts(run, 0)
    run.step(0)
    stale = greedy_rollouts(run, 1)
    assert run.live.decoder.stats.prefix_cache_hit_tokens > 0
    with pytest.raises(AssertionError, match="row"):
        check_follows(run.engine.module, stale, T, eos)


# ---------------------------------------------------------------- 3. a real learning test
LEARN_STEPS, FIRST, LAST = 20, 2, 5


def test_grpo_raises_the_mean_reward(warm_model, tmp_path):
    """Right response always shown first, no shuffle: "\\boxed{9, 2}" is always +1 and "\\boxed{2, 9}" -1, so
    the policy can learn the reward from its output alone. The warm start says each about half the time. 20 GRPO
    steps of 8 prompts x 4 samples at temperature 1, Adam lr 5e-4, beta 0.08 against the frozen warm start.

    Measured with 3 warm starts (model init seeds 0, 1, 2) x 3 GRPO seeds: the mean reward of the first 2 steps
    0.00-0.38, of the last 5 0.64-0.86, each run's gain >= 0.44 (this seed pair: 0.375 -> 0.825); parse failures
    of the last 5 steps <= 12%. Without the KL term (beta 0) the same lr collapsed one run in nine at step 8:
    the negative advantage of "\\boxed{2, 9}" also pushes down the tokens after "2, ", the freed mass went to
    "}", which spread to "\\boxed{}}}}}}" everywhere (all -1, no gradient); the reference's KL pulls it back."""
    data = write_examples_jsonl(tmp_path / "examples.jsonl", shown_best(64, seed=2))
    out = tmp_path / "run"
    train("grpo", dict(model=warm_model, data=data, output_dir=str(out), max_steps=LEARN_STEPS,
                       per_device_train_batch_size=8, num_generations=4, learning_rate=5e-4,
                       lr_scheduler_type="constant", beta=0.08, shuffle=False, temperature=1.0,
                       max_completion_length=8, logging_steps=1, save_steps=0, log_completions_steps=0, seed=0,
                       device="cpu", **QUIET), log=lambda *a: None)
    rows = read_metrics(out)
    rewards = [r["reward_mean"] for r in rows]
    assert len(rewards) == LEARN_STEPS
    first, last = sum(rewards[:FIRST]) / FIRST, sum(rewards[-LAST:]) / LAST
    curve = " ".join(f"{r:+.2f}" for r in rewards)
    assert last >= first + 0.25 and last >= 0.5, f"first {first:+.3f}, last {last:+.3f}: {curve}"
    assert sum(r["parse_failure_rate"] for r in rows[-LAST:]) / LAST < 0.25, "the format broke"
