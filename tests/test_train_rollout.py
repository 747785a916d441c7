"""GRPO rollouts (grm_engine.train.rollout) on the CPU with tiny models.

Models, built once per module: a byte-level BPE tokenizer trained on GRM prompts (grm_engine/demo.py), a
random-init 2-layer Qwen2 (its critiques never parse), and a tiny Llama overfit to answer every prompt with
"\\boxed{9, 2}" (9 for the response shown first), so rewards depend on the shuffled order.
References are independent of the code under test: rewards from detokenized text through parse_scores and an
un-shuffle written out by hand, hand-made completions with hand-written verdicts, transformers' forward for
greedy tokens.
"""
import math

import numpy as np
import pytest
import torch

from grm_engine import Decoder, Example, ParseStatus, VocabBytes, parse_scores, rule_reward
from grm_engine.demo import DEMO_CRITIQUE, make_examples, tiny_config
from grm_engine.protocol import build_prompt
from grm_engine.train.rollout import Rollouts, decode_samples, generate_rollouts, rewards_from_tokens, rollout_metrics
from test_grm import build_models

SEED = 7


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("grm_models"))  # shared with test_grm.py / test_cli.py


@pytest.fixture(scope="module")
def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models["tokenizer"])


@pytest.fixture(scope="module")
def vocab_bytes(tokenizer):
    return VocabBytes(tokenizer)


def random_qwen2(tokenizer, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.Qwen2ForCausalLM(tiny_config("qwen2", tokenizer)).eval()


@pytest.fixture(scope="module")
def random_decoder(tokenizer):
    return Decoder.from_pretrained(random_qwen2(tokenizer), tokenizer=tokenizer, num_kv_blocks=2048)


@pytest.fixture(scope="module")
def overfit_decoder(models, tokenizer):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(models["overfit"]).eval()  # a live module, as in training
    return Decoder.from_pretrained(model, tokenizer=tokenizer, num_kv_blocks=2048)


@pytest.fixture(scope="module")
def sampled(overfit_decoder, tokenizer, vocab_bytes):
    """The overfit GRM's samples at temperature 1: mostly its critique, sometimes not."""
    examples = labelled_examples()
    return examples, rollouts(overfit_decoder, tokenizer, vocab_bytes, examples, max_completion_length=12,
                              return_logprobs=True)


def labelled_examples():
    """2- and 3-response examples with best at different positions."""
    examples = make_examples(6, seed=3, three_every=3)
    for i, e in enumerate(examples):
        e.best = i % e.num_responses
    return examples


def rollouts(decoder, tokenizer, vocab_bytes, examples, **kwargs):
    settings = dict(num_generations=4, temperature=1.0, max_completion_length=6, seed=SEED, step=0)
    settings.update(kwargs)
    return generate_rollouts(decoder, tokenizer, vocab_bytes, examples, **settings)


def prompt_ids(tokenizer, example, shown_order):
    text = build_prompt(example.query, [example.responses[i] for i in shown_order], tokenizer=tokenizer)
    return tokenizer(text)["input_ids"]


def test_shapes_grouping_and_permutations(random_decoder, tokenizer, vocab_bytes):
    examples = labelled_examples()
    G = 4
    r = rollouts(random_decoder, tokenizer, vocab_bytes, examples, ignore_eos=True, return_logprobs=True)
    N, n_max = len(examples) * G, 3
    assert r.example_index.tolist() == [g for g in range(len(examples)) for _ in range(G)]
    assert tuple(r.permutation.shape) == (N, n_max) and tuple(r.scores.shape) == (N, n_max)
    assert tuple(r.completion_ids.shape) == tuple(r.completion_mask.shape) == tuple(r.completion_logprobs.shape) == (N, 6)
    assert r.completion_mask.all() and r.finish_reasons == ["length"] * N and r.generated_tokens == N * 6
    assert r.status.dtype == torch.int8 and r.rewards.dtype == torch.float32 and r.correct.dtype == torch.bool
    lp = r.completion_logprobs
    assert torch.isfinite(lp).all() and (lp <= 0).all() and (lp < 0).any()
    # random weights never write a score group: every sample is unparseable, reward -1
    assert (r.status == ParseStatus.NO_SCORES).all() and (r.rewards == -1).all() and not r.correct.any()
    for i in range(N):
        example = examples[i // G]
        n = example.num_responses
        perm = r.permutation[i].tolist()
        assert sorted(perm[:n]) == list(range(n)) and perm[n:] == list(range(n, n_max))
        # the prompt really shows the responses in that order
        assert r.prompt_ids[i] == prompt_ids(tokenizer, example, perm[:n])
    # samples that drew the same order share one prompt object (one request), different orders do not
    for g in range(len(examples)):
        rows = range(g * G, (g + 1) * G)
        for a in rows:
            for b in rows:
                same = r.permutation[a].tolist() == r.permutation[b].tolist()
                assert (r.prompt_ids[a] is r.prompt_ids[b]) == same
    shuffled = [tuple(p) for p in r.permutation.tolist()]
    assert len(set(shuffled)) > 2  # orders really vary
    other_step = rollouts(random_decoder, tokenizer, vocab_bytes, examples, ignore_eos=True, step=1)  # same seed
    assert [tuple(p) for p in other_step.permutation.tolist()] != shuffled
    assert not torch.equal(other_step.completion_ids, r.completion_ids)
    no_shuffle = rollouts(random_decoder, tokenizer, vocab_bytes, examples, shuffle=False, max_completion_length=1)
    assert no_shuffle.permutation.tolist() == [list(range(n_max))] * N


def test_padding(sampled):
    _, r = sampled
    lengths = r.completion_mask.sum(dim=1)
    assert lengths.min() < lengths.max()  # precondition: ragged rows
    assert r.generated_tokens == int(lengths.sum()) and r.completion_ids.shape[1] == int(lengths.max())
    assert (r.completion_ids[~r.completion_mask] == 0).all() and (r.completion_logprobs[~r.completion_mask] == 0).all()
    assert r.completion_mask[:, 0].all() and (r.completion_mask[:, :-1] >= r.completion_mask[:, 1:]).all()
    assert torch.isfinite(r.completion_logprobs).all() and (r.completion_logprobs[r.completion_mask] < 0).any()


def test_greedy_rewards_and_metrics(overfit_decoder, tokenizer, vocab_bytes):
    """Greedy, the overfit GRM writes DEMO_CRITIQUE: 9 for the response shown first, 2 for the second."""
    examples = labelled_examples()
    r = rollouts(overfit_decoder, tokenizer, vocab_bytes, examples, temperature=0.0, max_completion_length=12)
    critique_tokens = len(tokenizer(DEMO_CRITIQUE)["input_ids"]) + 1  # + EOS
    expected = []
    for i in range(r.num_samples):
        example = examples[i // 4]
        shown_first = r.permutation[i, 0].item()
        expected.append(1.0 if example.num_responses == 2 and shown_first == example.best else -1.0)
    assert r.rewards.tolist() == expected and 0 < expected.count(1.0) < len(expected)
    assert r.finish_reasons == ["stop"] * r.num_samples
    m = rollout_metrics(r)
    assert m["reward_mean"] == pytest.approx(np.mean(expected)) and m["reward_std"] == pytest.approx(np.std(expected))
    assert m["accuracy"] == pytest.approx(expected.count(1.0) / len(expected))
    assert m["parse_failure_rate/WRONG_COUNT"] == pytest.approx(2 / 6)  # examples 2 and 5 have 3 responses
    assert m["parse_failure_rate/NO_SCORES"] == m["parse_failure_rate/OUT_OF_RANGE"] == 0
    assert m["completion_length_mean"] == pytest.approx(critique_tokens) and m["truncated_fraction"] == 0
    samples = decode_samples(r, tokenizer, 5)
    assert [s["completion"] for s in samples] == [DEMO_CRITIQUE] * 5
    assert samples[4]["example"] == examples[1].id and samples[4]["sample"] == 0
    assert [s["reward"] for s in samples] == expected[:5]
    assert samples[0]["scores"][samples[0]["permutation"][0]] == 9.0


def test_rewards_equal_parse_of_decoded_text(sampled, tokenizer):
    examples, r = sampled
    G, N = 4, len(examples) * 4
    texts, counts = [], []
    for i in range(N):
        length = int(r.completion_mask[i].sum())
        texts.append(tokenizer.decode(r.completion_ids[i, :length].tolist(), skip_special_tokens=True))
        counts.append(examples[i // G].num_responses)
    shown, status = parse_scores(texts, counts)
    original = torch.full((N, 3), float("nan"))
    expected_correct = []
    for i in range(N):  # un-shuffle by hand: the score shown at position p belongs to response perm[p]
        example = examples[i // G]
        perm = r.permutation[i].tolist()
        for p in range(counts[i]):
            original[i, perm[p]] = shown[i, p]
        row = original[i, : counts[i]].tolist()
        expected_correct.append(int(status[i]) == ParseStatus.OK and
                                all(row[example.best] > v for j, v in enumerate(row) if j != example.best))
    best = torch.tensor([e.best for e in examples]).repeat_interleave(G)
    assert torch.equal(r.status, status)
    assert torch.equal(r.scores.isnan(), original.isnan())
    assert torch.equal(r.scores.nan_to_num(-1), original.nan_to_num(-1))
    assert torch.equal(r.rewards, rule_reward(original, status, best))
    assert r.correct.tolist() == expected_correct
    # not vacuous: right and wrong verdicts, and WRONG_COUNT for the 3-response examples
    assert set(r.rewards.tolist()) == {1.0, -1.0}
    assert {ParseStatus.OK, ParseStatus.WRONG_COUNT} <= {ParseStatus(int(s)) for s in r.status}


def test_rewards_of_hand_made_completions(tokenizer, vocab_bytes):
    eos = tokenizer.eos_token_id
    junk = tokenizer("\\boxed{1, 1}")["input_ids"]  # past each row's length: must be ignored
    cases = [  # (completion, n, best, permutation shown -> original, status, reward)
        ("Analysis: fine.\n\\boxed{2, 9}", 2, 0, [1, 0], ParseStatus.OK, 1.0),  # original [9, 2]
        ("\\boxed{2, 9}", 2, 0, [0, 1], ParseStatus.OK, -1.0),  # original [2, 9]: the wrong one wins
        ("\\boxed{9, 2}", 2, 1, [1, 0], ParseStatus.OK, 1.0),  # original [2, 9]: the best (1) wins
        ("\\boxed{5, 5}", 2, 0, [1, 0], ParseStatus.OK, -1.0),  # tied with the best: wrong (strict)
        ("\\boxed{9}", 2, 0, [0, 1], ParseStatus.WRONG_COUNT, -1.0),
        ("\\boxed{9, 2, 1}", 2, 0, [0, 1], ParseStatus.WRONG_COUNT, -1.0),
        ("no scores here", 2, 0, [1, 0], ParseStatus.NO_SCORES, -1.0),
        ("\\boxed{9, two}", 2, 0, [0, 1], ParseStatus.NO_SCORES, -1.0),
        ("\\boxed{11, 2}", 2, 0, [0, 1], ParseStatus.OUT_OF_RANGE, -1.0),
        ("\\boxed{3, 8} then \\boxed{8, 3}", 2, 1, [1, 0], ParseStatus.OK, 1.0),  # the last group counts
        ("\\boxed{8, 3, 1}", 3, 2, [2, 0, 1], ParseStatus.OK, 1.0),  # original [3, 1, 8]
        ("\\boxed{8, 3, 1}", 3, 0, [2, 0, 1], ParseStatus.OK, -1.0),
        ("\\boxed{1, 7.5, 7.5}", 3, 1, [0, 2, 1], ParseStatus.OK, -1.0),  # best tied with another
        ("\\boxed{7}", 1, 7, [0], ParseStatus.OK, 1.0),  # one response: correct iff score == label
        ("\\boxed{6}", 1, 7, [0], ParseStatus.OK, -1.0),
    ]
    rows = [tokenizer(text)["input_ids"] + [eos] for text, *_ in cases]
    lengths = torch.tensor([len(ids) for ids in rows])
    width = int(lengths.max()) + len(junk)
    completion_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ids in enumerate(rows):
        completion_ids[i, : len(ids)] = torch.tensor(ids)
        completion_ids[i, len(ids): len(ids) + len(junk)] = torch.tensor(junk)
    permutation = torch.tensor([perm + list(range(len(perm), 3)) for *_, perm, _, _ in cases])
    targets = torch.tensor([float(best) for _, _, best, *_ in cases], dtype=torch.float64)
    counts = torch.tensor([n for _, n, *_ in cases])
    result = rewards_from_tokens(completion_ids, lengths, vocab_bytes, permutation, targets, counts, lo=1, hi=10)
    assert [ParseStatus(int(s)) for s in result.status] == [c[4] for c in cases]
    assert result.rewards.tolist() == [c[5] for c in cases]
    assert result.correct.tolist() == [c[5] > 0 for c in cases]
    assert result.scores[0, :2].tolist() == [9.0, 2.0] and result.scores[10].tolist() == [3.0, 1.0, 8.0]
    assert result.scores[6].isnan().all() and result.scores[8, :2].tolist() == [11.0, 2.0]

    # the single-response template: range 0..1, label 0 or 1
    singles = [("\\boxed{1}", 1.0, ParseStatus.OK, 1.0), ("\\boxed{0}", 1.0, ParseStatus.OK, -1.0),
               ("\\boxed{0}", 0.0, ParseStatus.OK, 1.0), ("\\boxed{2}", 1.0, ParseStatus.OUT_OF_RANGE, -1.0)]
    ids = [tokenizer(text)["input_ids"] for text, *_ in singles]
    width = max(len(x) for x in ids)
    completion_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    result = rewards_from_tokens(completion_ids, torch.tensor([len(x) for x in ids]), vocab_bytes,
                                 torch.zeros(len(ids), 1, dtype=torch.long), torch.tensor([s[1] for s in singles]),
                                 1, lo=0, hi=1)
    assert [ParseStatus(int(s)) for s in result.status] == [s[2] for s in singles]
    assert result.rewards.tolist() == [s[3] for s in singles]


def rows_by_example(r: Rollouts, examples, G: int) -> dict:
    out = {}
    for g, example in enumerate(examples):
        rows = []
        for i in range(g * G, (g + 1) * G):
            length = int(r.completion_mask[i].sum())
            rows.append((r.permutation[i, : example.num_responses].tolist(), r.completion_ids[i, :length].tolist(),
                         r.completion_logprobs[i, :length], float(r.rewards[i]), r.finish_reasons[i], r.prompt_ids[i]))
        out[example.id] = rows
    return out


def test_deterministic_whatever_the_batching(random_decoder, tokenizer, vocab_bytes):
    examples = labelled_examples()
    kwargs = dict(num_generations=3, max_completion_length=8, return_logprobs=True, seed=SEED, step=5)
    first = rollouts(random_decoder, tokenizer, vocab_bytes, examples, **kwargs)
    again = rollouts(random_decoder, tokenizer, vocab_bytes, examples, **kwargs)
    for name in ("permutation", "completion_ids", "completion_mask", "completion_logprobs", "rewards", "status"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert first.finish_reasons == again.finish_reasons and first.prompt_ids == again.prompt_ids
    whole = rows_by_example(first, examples, 3)
    parts = [examples[3:][::-1], examples[:1], examples[1:3]]
    for part in parts:
        piece = rows_by_example(rollouts(random_decoder, tokenizer, vocab_bytes, part, **kwargs), part, 3)
        for example_id, rows in piece.items():
            for got, want in zip(rows, whole[example_id]):
                assert got[0] == want[0] and got[1] == want[1] and got[3:] == want[3:]
                torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    # really sampled: the G samples of an example differ
    assert all(len({tuple(row[1]) for row in rows}) > 1 for rows in whole.values())


def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' forward, argmax, the whole sequence every step (no cache, no EOS stop)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_rollouts_read_the_live_weights(tokenizer, vocab_bytes):
    model = random_qwen2(tokenizer, seed=3)
    decoder = Decoder.from_pretrained(model, tokenizer=tokenizer, num_kv_blocks=512)
    examples = labelled_examples()[:2]
    kwargs = dict(num_generations=2, temperature=0.0, max_completion_length=6, ignore_eos=True)

    def check(r):
        for i in range(r.num_samples):
            assert r.completion_ids[i].tolist() == reference_greedy(model, r.prompt_ids[i], 6)
        return r.completion_ids.clone()

    before = check(rollouts(decoder, tokenizer, vocab_bytes, examples, **kwargs))
    with torch.no_grad():  # an optimizer step in miniature: in place, on merged (MLP) and unmerged (head) weights
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(-3.0)
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    after = check(rollouts(decoder, tokenizer, vocab_bytes, examples, **kwargs))
    assert not torch.equal(before, after)


def test_prompt_longer_than_the_context_fails_before_generating(tokenizer, vocab_bytes, monkeypatch):
    model = random_qwen2(tokenizer)
    decoder = Decoder.from_pretrained(model, tokenizer=tokenizer, num_kv_blocks=64, max_model_len=64)
    monkeypatch.setattr(decoder, "generate", lambda *a, **k: pytest.fail("generated despite a too-long prompt"))
    long = Example(id="too-long", query="word " * 80, responses=["a", "b"], best=0)
    with pytest.raises(ValueError, match="too-long"):
        rollouts(decoder, tokenizer, vocab_bytes, [long])
    with pytest.raises(ValueError, match="single"):
        rollouts(decoder, tokenizer, vocab_bytes, [long], template="single")


def test_metrics_of_known_rollouts():
    # B = 3 groups of G = 2: rewards [+1 +1 | -1 +1 | -1 -1] -> two zero-advantage groups of three
    rewards = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0])
    status = torch.tensor([0, 0, 3, 0, 1, 2], dtype=torch.int8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    r = Rollouts(example_index=torch.arange(3).repeat_interleave(2), permutation=torch.zeros(6, 1, dtype=torch.long),
                 prompt_ids=[[1]] * 6, completion_ids=mask.long(), completion_mask=mask, completion_logprobs=None,
                 scores=torch.zeros(6, 1), status=status, correct=rewards > 0, rewards=rewards,
                 finish_reasons=["stop", "stop", "length", "stop", "length", "stop"], seconds=2.0,
                 generated_tokens=16, group_size=2)
    m = rollout_metrics(r)
    assert m["reward_mean"] == pytest.approx(0.0) and m["reward_std"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(0.5) and m["zero_advantage_group_fraction"] == pytest.approx(2 / 3)
    assert m["parse_failure_rate/NO_SCORES"] == pytest.approx(1 / 6)
    assert m["parse_failure_rate/WRONG_COUNT"] == pytest.approx(1 / 6)
    assert m["parse_failure_rate/OUT_OF_RANGE"] == pytest.approx(1 / 6)
    assert m["completion_length_mean"] == pytest.approx(16 / 6) and m["completion_length_max"] == 4
    assert m["truncated_fraction"] == pytest.approx(2 / 6) and m["rollout_tokens_per_second"] == pytest.approx(8.0)
    assert not any(isinstance(v, float) and math.isnan(v) for v in m.values())
