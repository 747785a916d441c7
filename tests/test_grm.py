"""GRM scoring end to end on the CPU with real (tiny) models.

Models, built once per session:
  - a byte-level BPE tokenizer trained here on GRM prompts;
  - a random-init Qwen2 GRM: its critiques never parse, so every sample must be counted as a failure;
  - a tiny Llama OVERFIT here (grm_engine/demo.py, as `grm-engine demo` builds it) to answer every prompt with
    CRITIQUE ("\\boxed{9, 2}") whatever the order (about 60-120 Adam steps), so after un-shuffling the totals are known exactly: 9 for the response shown first, 2 for the one shown
    second, per sample; a 3-response example gets WRONG_COUNT;
  - a random-init Llama sequence classifier with one label (meta RM), and a causal LM + saved head.
"""
import pytest
import torch

from grm_engine.demo import DEMO_CRITIQUE, build_tokenizer, make_examples, overfit, tiny_config
from grm_engine.grm import GRM, ScoreResult, check_checkpoint_dir, sample_permutation
from grm_engine.parsing import ParseStatus
from grm_engine.protocol import build_meta_prompt, build_prompt

CRITIQUE = DEMO_CRITIQUE
_MODELS: dict = {}


def build_models(root) -> dict:
    """Every model directory, built once per process (test_cli.py shares them)."""
    if _MODELS:
        return _MODELS
    import transformers as tf

    torch.manual_seed(0)
    tokenizer = build_tokenizer(root / "tokenizer")
    paths = {"tokenizer": root / "tokenizer"}
    random_grm = tf.Qwen2ForCausalLM(tiny_config("qwen2", tokenizer))
    fitted = overfit(tf.LlamaForCausalLM(tiny_config("llama", tokenizer)), tokenizer)
    classifier = tf.LlamaForSequenceClassification(tiny_config("llama", tokenizer, num_labels=1))
    for name, model in (("random", random_grm), ("overfit", fitted), ("meta", classifier)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    _MODELS.update({name: str(path) for name, path in paths.items()})
    return _MODELS


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("grm_models"))


@pytest.fixture(scope="session")
def overfit_grm(models):
    return GRM.from_pretrained(models["overfit"], num_kv_blocks=512)


def expected_totals(example, k: int, seed: int) -> list[float] | None:
    """The fixed critique gives 9 to the response shown first and 2 to the one shown second."""
    if example.num_responses != 2:
        return None
    totals = [0.0, 0.0]
    for j in range(k):
        perm = sample_permutation(seed, example.id, j, 2, True)
        totals[perm[0]] += 9
        totals[perm[1]] += 2
    return totals


def test_overfit_grm_known_totals(overfit_grm):
    examples = make_examples(8, three_every=4)
    result = overfit_grm.score(examples, k=4, temperature=0.5, seed=3, max_tokens=24)
    assert result.parse_failures == {"NO_SCORES": 0, "WRONG_COUNT": 2 * 4, "OUT_OF_RANGE": 0}
    for example, scored in zip(examples, result.examples):
        assert scored.id == example.id
        want = expected_totals(example, 4, 3)
        assert scored.totals == want if want else scored.totals == [None, None, None]
        top = [i for i, v in enumerate(want or []) if v == max(want)]
        assert scored.best == (top[0] if len(top) == 1 else -1)
        for j, sample in enumerate(scored.samples):
            assert sample.text.endswith("\\boxed{9, 2}")
            assert sorted(sample.permutation) == list(range(example.num_responses))
            assert sample.permutation == sample_permutation(3, example.id, j, example.num_responses, True)
            if example.num_responses == 2:
                assert sample.status == "OK" and sample.voted
                assert sample.scores[sample.permutation[0]] == 9 and sample.scores[sample.permutation[1]] == 2
            else:
                assert sample.status == "WRONG_COUNT" and not sample.voted and sample.scores == [None] * 3
    # permutations are not all the identity (the test would not see a missing un-shuffle otherwise)
    assert any(s.permutation != [0, 1] for e in result.examples for s in e.samples)
    assert result.generated_tokens == sum(s.num_tokens for e in result.examples for s in e.samples) > 0


def test_one_decoder_run_with_merged_prompt_variants(overfit_grm, monkeypatch):
    calls = []
    generate = overfit_grm.decoder.generate

    def spy(prompts, params, **kwargs):
        calls.append((prompts, params))
        return generate(prompts, params, **kwargs)
    monkeypatch.setattr(overfit_grm.decoder, "generate", spy)
    examples = make_examples(6)
    overfit_grm.score(examples, k=5, seed=1, max_tokens=24)
    assert len(calls) == 1
    prompts, params = calls[0]
    distinct = sum(len({tuple(sample_permutation(1, e.id, j, 2, True)) for j in range(5)}) for e in examples)
    assert len(prompts) == distinct < 6 * 5
    assert sum(p.n for p in params) == 6 * 5
    assert len({tuple(p) for p in prompts}) == len(prompts)  # each prompt variant appears once


def test_independent_of_data_order_and_deterministic(overfit_grm):
    examples = make_examples(6)
    forward = overfit_grm.score(examples, k=3, seed=11, max_tokens=24)
    backward = overfit_grm.score(examples[::-1], k=3, seed=11, max_tokens=24)
    again = overfit_grm.score(examples, k=3, seed=11, max_tokens=24)
    other_seed = overfit_grm.score(examples, k=3, seed=12, max_tokens=24)
    by_id = {e.id: e for e in backward.examples}
    for a, c in zip(forward.examples, again.examples):
        assert a.to_json() == c.to_json()
        assert [s.permutation for s in a.samples] == [s.permutation for s in by_id[a.id].samples]
        assert a.totals == by_id[a.id].totals
    assert [s.permutation for e in forward.examples for s in e.samples] != \
        [s.permutation for e in other_seed.examples for s in e.samples]


def test_sampled_texts_do_not_depend_on_data_order(models):
    grm = GRM.from_pretrained(models["random"], num_kv_blocks=256)
    examples = make_examples(5, three_every=2)
    forward = grm.score(examples, k=3, temperature=1.0, seed=8, max_tokens=8)
    backward = {e.id: e for e in grm.score(examples[::-1], k=3, temperature=1.0, seed=8, max_tokens=8).examples}
    other_seed = grm.score(examples, k=3, temperature=1.0, seed=9, max_tokens=8)
    for a, b in zip(forward.examples, other_seed.examples):
        assert [s.text for s in a.samples] == [s.text for s in backward[a.id].samples]
    assert [s.text for e in forward.examples for s in e.samples] != [s.text for e in other_seed.examples for s in e.samples]
    assert len({s.text for e in forward.examples for s in e.samples}) > 5  # really sampled


def test_greedy_k1_is_the_decoder_greedy_answer(models):
    from grm_engine.decode import Decoder, SamplingParams

    grm = GRM.from_pretrained(models["random"], num_kv_blocks=256)
    examples = make_examples(3)
    result = grm.score(examples, k=1, temperature=0.0, seed=4, max_tokens=10)
    for example, scored in zip(examples, result.examples):
        perm = sample_permutation(4, example.id, 0, 2, True)
        prompt = grm.tokenizer(build_prompt(example.query, [example.responses[i] for i in perm]))["input_ids"]
        decoder = Decoder.from_pretrained(models["random"], num_kv_blocks=64)
        want = decoder.generate([prompt], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
        assert scored.samples[0].text == want[0].outputs[0].text


def test_unparseable_critiques_are_counted_not_scored(models):
    grm = GRM.from_pretrained(models["random"], num_kv_blocks=256)
    examples = make_examples(4, three_every=2)
    # ignore_eos: every critique runs to max_tokens, so the token count below does not depend on the draws
    result = grm.score(examples, k=3, temperature=1.0, seed=0, max_tokens=12, ignore_eos=True)
    assert sum(result.parse_failures.values()) == result.num_samples == 12
    assert result.parse_failures["NO_SCORES"] == 12
    for scored in result.examples:
        assert scored.best == -1 and all(v is None for v in scored.totals)
        assert all(s.status == "NO_SCORES" and not s.voted and s.scores == [None] * len(scored.totals)
                   for s in scored.samples)
    stats = result.stats()
    assert stats["generated_tokens"] == 12 * 12 and stats["tokens_per_second"] > 0


class OrderMetaRM:
    """A stand-in meta RM with known scores: 1 when the critique saw the original first response first."""

    def __init__(self, examples):
        self.first = {e.query: e.responses[0] for e in examples}

    def score(self, queries, responses, critiques):
        return torch.tensor([float(r[0] == self.first[q]) for q, r in zip(queries, responses)])


def test_meta_filter_keeps_top_k_meta(overfit_grm):
    examples = make_examples(6, three_every=3)
    grm = GRM(overfit_grm.decoder, overfit_grm.tokenizer, meta_rm=OrderMetaRM(examples))
    result = grm.score(examples, k=5, k_meta=2, seed=7, max_tokens=24)
    for example, scored in zip(examples, result.examples):
        if example.num_responses == 3:
            assert all(s.meta is None and not s.voted for s in scored.samples) and scored.best == -1
            continue
        perms = [sample_permutation(7, example.id, j, 2, True) for j in range(5)]
        meta = [float(p[0] == 0) for p in perms]
        keep = sorted(range(5), key=lambda j: (-meta[j], j))[:2]  # ties go to the lower sample index
        totals = [0.0, 0.0]
        for j in keep:
            totals[perms[j][0]] += 9
            totals[perms[j][1]] += 2
        assert [s.meta for s in scored.samples] == meta
        assert [s.voted for s in scored.samples] == [j in keep for j in range(5)]
        assert scored.totals == totals
    # fewer samples from the same draw: vote_first re-votes the first k
    smaller = result.vote_first(3, k_meta=1, use_meta=True)
    assert smaller.used[:, 3:].numel() == 0 and int(smaller.used.sum()) == 4  # one per 2-response example


def test_meta_rm_classifier_matches_transformers(models):
    import transformers as tf

    from grm_engine.meta_rm import MetaRM

    meta = MetaRM.from_pretrained(models["meta"], max_batch_tokens=700)  # several length buckets
    reference = tf.AutoModelForSequenceClassification.from_pretrained(models["meta"]).eval()
    examples = make_examples(5)
    critiques = [CRITIQUE, "short", CRITIQUE * 3, "Analysis: long " * 20, "x"]
    logits = meta.score([e.query for e in examples], [e.responses for e in examples], critiques)
    tokenizer = meta.tokenizer
    for i, (e, c) in enumerate(zip(examples, critiques)):
        ids = tokenizer(build_meta_prompt(e.query, e.responses, c))["input_ids"]
        with torch.no_grad():
            want = reference(input_ids=torch.tensor([ids])).logits[0, 0]
        torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5)


def test_meta_rm_causal_lm_with_head(models, tmp_path):
    import transformers as tf
    from safetensors.torch import save_file

    from grm_engine.meta_rm import HEAD_FILE, MetaRM

    body = tf.LlamaForCausalLM.from_pretrained(models["overfit"])
    body.save_pretrained(tmp_path)
    tf.AutoTokenizer.from_pretrained(models["tokenizer"]).save_pretrained(tmp_path)
    head = {"weight": torch.randn(1, 64), "bias": torch.randn(1)}
    save_file(head, str(tmp_path / HEAD_FILE))
    meta = MetaRM.from_pretrained(str(tmp_path))
    e = make_examples(1)[0]
    got = meta.score([e.query, e.query], [e.responses, e.responses[::-1]], [CRITIQUE, "no"])
    for i, (responses, critique) in enumerate(((e.responses, CRITIQUE), (e.responses[::-1], "no"))):
        ids = meta.tokenizer(build_meta_prompt(e.query, responses, critique))["input_ids"]
        with torch.no_grad():
            hidden = body.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        torch.testing.assert_close(got[i], hidden @ head["weight"][0] + head["bias"][0], rtol=1e-5, atol=1e-5)


def test_grm_with_real_meta_rm(models, overfit_grm):
    from grm_engine.meta_rm import MetaRM

    meta = MetaRM.from_pretrained(models["meta"])
    grm = GRM(overfit_grm.decoder, overfit_grm.tokenizer, meta_rm=meta)
    examples = make_examples(3)
    result = grm.score(examples, k=4, seed=2, max_tokens=24)  # k_meta defaults to 2
    for example, scored in zip(examples, result.examples):
        shown = [[example.responses[i] for i in s.permutation] for s in scored.samples]
        want = meta.score([example.query] * 4, shown, [s.text for s in scored.samples])
        assert [s.meta for s in scored.samples] == pytest.approx(want.tolist(), rel=1e-6)
        assert sum(s.voted for s in scored.samples) == 2
        top = sorted(range(4), key=lambda j: (-want[j].item(), j))[:2]
        assert [s.voted for s in scored.samples] == [j in top for j in range(4)]


def test_concat_equals_one_run(overfit_grm):
    examples = make_examples(5, three_every=3)
    whole = overfit_grm.score(examples, k=2, seed=0, max_tokens=24)
    parts = ScoreResult.concat([overfit_grm.score(examples[:2], k=2, seed=0, max_tokens=24),
                                overfit_grm.score(examples[2:], k=2, seed=0, max_tokens=24)])
    assert torch.equal(whole.vote_first(2).totals.nan_to_num(-1), parts.vote_first(2).totals.nan_to_num(-1))
    assert whole.parse_failures == parts.parse_failures and torch.equal(whole.perm, parts.perm)


def test_argument_and_checkpoint_errors(models, overfit_grm, tmp_path):
    with pytest.raises(ValueError, match="k = 0"):
        overfit_grm.score(make_examples(1), k=0)
    with pytest.raises(ValueError, match="k_meta needs a meta RM"):
        overfit_grm.score(make_examples(1), k=2, k_meta=1)
    with pytest.raises(ValueError, match="no config.json"):
        check_checkpoint_dir(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        check_checkpoint_dir(str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        check_checkpoint_dir(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        check_checkpoint_dir(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no tokenizer files"):
        check_checkpoint_dir(str(tmp_path))
    check_checkpoint_dir(models["overfit"])
    assert ParseStatus.OK == 0


@pytest.mark.gpu
def test_gpu_scoring_matches_known_totals(models):
    grm = GRM.from_pretrained(models["overfit"], device="cuda", dtype=torch.float32)
    examples = make_examples(16, three_every=4)
    result = grm.score(examples, k=8, seed=3, max_tokens=24)
    for example, scored in zip(examples, result.examples):
        want = expected_totals(example, 8, 3)
        assert scored.totals == (want if want else [None] * 3)


@pytest.mark.gpu
def test_gpu_parse_and_vote_equal_the_cpu_path(models):
    from grm_engine.gpu_scoring import parse_scores_from_tokens, vote_cuda
    from grm_engine.vocab_bytes import VocabBytes

    examples = make_examples(16, three_every=4)
    for name in ("overfit", "random"):
        grm = GRM.from_pretrained(models[name], device="cuda", meta_rm=OrderMetaRM(examples))
        result = grm.score(examples, k=8, temperature=1.0, seed=5, max_tokens=24)
        flat = [ids for row in result.token_ids for ids in row]  # [G * k] lists
        ids = torch.zeros(len(flat), max(map(len, flat)), dtype=torch.int64)
        for i, row in enumerate(flat):
            ids[i, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(row) for row in flat])
        counts = result.n_responses.repeat_interleave(8)
        parsed = parse_scores_from_tokens(ids.cuda(), lengths.cuda(), VocabBytes(grm.tokenizer), counts.cuda())
        assert torch.equal(parsed.status.cpu(), result.status.reshape(-1))
        assert torch.equal(parsed.scores.cpu().nan_to_num(-7), result.scores.reshape(len(flat), -1).nan_to_num(-7))
        for meta in (None, result.meta):
            want = result.vote_first(8, use_meta=meta is not None)
            got = vote_cuda(result.scores.cuda(), result.status.cuda(), perm=result.perm.cuda(),
                            n_responses=result.n_responses.cuda(), meta=None if meta is None else meta.cuda(),
                            k_meta=None if meta is None else 4)
            assert torch.equal(got.totals.cpu().nan_to_num(-7), want.totals.nan_to_num(-7))
            assert torch.equal(got.best.cpu(), want.best) and torch.equal(got.used.cpu(), want.used)
