"""The meta RM stage (grm_engine.train.meta_rm): trained on the RFT samples of a tiny critic, loaded by
GRM.from_pretrained(meta_rm=...) and grm_engine.MetaRM with no conversion; its held-out metrics equal what the
scoring-time MetaRM computes on the same critiques; roc_auc equals a brute-force pairwise count."""
import itertools
import json
import math
import os
import random

import pytest
import torch

from grm_engine.train import train
from grm_engine.train.meta_rm import read_meta_rows, roc_auc, split_by_id
from train_helpers import build_base, build_rft_run, few_threads, read_metrics, rft_examples  # noqa: F401


def brute_force_auc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties one half, over every (positive, negative) pair."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return float("nan")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


def test_roc_auc_matches_pairwise_count():
    rng = random.Random(0)
    for trial in range(200):
        size = rng.randint(1, 30)
        scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(size)]  # many ties
        labels = [rng.randint(0, 1) for _ in range(size)]
        want, got = brute_force_auc(scores, labels), roc_auc(scores, labels)
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-12), (scores, labels)
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0 and roc_auc([0.9, 0.1], [0, 1]) == 0.0


def test_read_meta_rows_from_score_output(tmp_path):
    from grm_engine.demo import write_jsonl

    examples = rft_examples(2)
    data = write_jsonl(tmp_path / "examples.jsonl", examples)
    first = examples[0]  # best = 0
    line = {"id": first.id, "samples": [
        {"text": "a", "permutation": [1, 0], "scores": [9, 2], "status": "OK"},  # correct
        {"text": "b", "permutation": [0, 1], "scores": [2, 9], "status": "OK"},  # wrong
        {"text": "c", "permutation": [0, 1], "scores": [None, None], "status": "NO_SCORES"},  # never voted: left out
    ]}
    (tmp_path / "scores.jsonl").write_text(json.dumps(line) + "\n")
    rows = read_meta_rows(str(tmp_path / "scores.jsonl"), data)
    assert [(r["critique"], r["label"]) for r in rows] == [("a", 1), ("b", 0)]
    assert rows[0]["responses"] == [first.responses[1], first.responses[0]]  # the order the critique saw


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta_models")
    rft = build_rft_run(root)
    out = root / "meta"
    samples = os.path.join(rft["output_dir"], "rft_samples.jsonl")
    result = train("meta-rm", dict(model=build_base(root), data=samples, output_dir=str(out), max_steps=4,
                                   per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=2, save_steps=0,
                                   eval_fraction=0.3, report_plot=False, max_seq_length=1024), log=lambda *a: None)
    return {"rft": rft, "result": result, "output_dir": out}


def test_meta_rm_metrics_match_scoring_time_meta_rm(trained):
    """The held-out loss / accuracy / AUC the trainer logs equal those of grm_engine.MetaRM (the scoring-time
    class, its own encoding) on the same held-out critiques: training saw what scoring sees."""
    from grm_engine.meta_rm import MetaRM

    rows = read_meta_rows(os.path.join(trained["rft"]["output_dir"], "rft_samples.jsonl"))
    assert 0 < len(rows) <= 24  # from the 8 x 3 unhinted samples; hinted ones are left out
    _, held_out = split_by_id(rows, 0.3, 0)
    meta = MetaRM.from_pretrained(trained["result"].model_dir, device="cpu")
    logits = meta.score([r["query"] for r in held_out], [r["responses"] for r in held_out],
                        [r["critique"] for r in held_out])
    labels = torch.tensor([float(r["label"]) for r in held_out])
    logged = read_metrics(trained["output_dir"])
    assert [r["step"] for r in logged] == [2, 4]
    last = logged[-1]
    assert last["eval_loss"] == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item(), rel=1e-4)
    assert last["eval_accuracy"] == pytest.approx(((logits > 0).float() == labels).float().mean().item())
    want_auc = brute_force_auc(logits.tolist(), labels.tolist())
    if math.isnan(want_auc):
        assert last["eval_auc"] is None
    else:
        assert last["eval_auc"] == pytest.approx(want_auc, abs=1e-6)
    with open(os.path.join(trained["output_dir"], "meta_rm_eval.json")) as f:
        report = json.load(f)
    assert report["eval_rows"] == len(held_out) and report["train_rows"] == len(rows) - len(held_out)


def test_trained_meta_rm_loads_in_grm(trained):
    from grm_engine import GRM

    grm = GRM.from_pretrained(trained["rft"]["critic"], meta_rm=trained["result"].model_dir, num_kv_blocks=256)
    result = grm.score(rft_examples(4), k=4, temperature=1.0, seed=1, max_tokens=16)
    assert result.k_meta == 2
    ok = result.status == 0  # ParseStatus.OK
    assert ok.any()
    assert torch.isfinite(result.meta[ok]).all() and torch.isnan(result.meta[~ok]).all()
    assert len({round(v, 6) for v in result.meta[ok].tolist()}) > 1  # the head sees the responses, not one constant
