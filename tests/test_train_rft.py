"""Rejective fine-tuning (grm_engine.train.rft): the rejection rules on hand-made samples, and one `train rft` run
end to end on a tiny critic that answers "\\boxed{9, 2}" (9 for the response shown first), so a sample is correct
exactly when the shuffled order shows the best response first; 3-response examples never parse (two scores).

The end-to-end check recomputes every verdict from the sampled text with a parser and Eq. 10 written out here,
then the rules by hand, and compares with rft_samples.jsonl, rft_trajectories.jsonl and rft_counts.json.
"""
import json
import os
import re

import pytest

from grm_engine.protocol import build_prompt
from grm_engine.train.rft import select_trajectories
from train_helpers import build_rft_run, few_threads, read_metrics, rft_examples  # noqa: F401


def sample(hinted=False, correct=False, status="OK"):
    return {"hinted": hinted, "correct": correct, "status": status, "text": "..."}


ZERO = {"kept": 0, "kept_hinted": 0, "rejected_wrong": 0, "rejected_hinted_wrong": 0, "unparseable": 0,
        "dropped_too_easy": 0}


def counts(**nonzero):
    return {**ZERO, **nonzero}


def test_wrong_samples_dropped_correct_kept():
    samples = [sample(correct=True), sample(), sample(status="NO_SCORES"), sample(hinted=True, correct=True)]
    kept, got = select_trajectories(samples)
    assert kept == [samples[0], samples[3]]
    assert got == counts(kept=1, kept_hinted=1, rejected_wrong=2, unparseable=1)


def test_all_correct_example_dropped_with_its_hint():
    samples = [sample(correct=True)] * 3 + [sample(hinted=True, correct=True)]
    kept, got = select_trajectories(samples)
    assert kept == [] and got == counts(dropped_too_easy=1)
    kept, got = select_trajectories([sample(correct=True)] * 3)  # no hinted sample
    assert kept == [] and got == counts(dropped_too_easy=1)


def test_hinted_kept_only_if_correct():
    wrong_hint = [sample(), sample(correct=True), sample(), sample(hinted=True)]
    kept, got = select_trajectories(wrong_hint)
    assert kept == [wrong_hint[1]]
    assert got == counts(kept=1, rejected_wrong=2, rejected_hinted_wrong=1)
    all_wrong = [sample(status="WRONG_COUNT"), sample(status="OUT_OF_RANGE"), sample(), sample(hinted=True,
                                                                                              correct=True)]
    kept, got = select_trajectories(all_wrong)
    assert kept == [all_wrong[3]]
    assert got == counts(kept_hinted=1, rejected_wrong=3, unparseable=2)


def test_unparseable_hinted_counted():
    samples = [sample(), sample(), sample(correct=True), sample(hinted=True, status="NO_SCORES")]
    kept, got = select_trajectories(samples)
    assert kept == [samples[2]]
    assert got == counts(kept=1, rejected_wrong=2, rejected_hinted_wrong=1, unparseable=1)


# ---------------------------------------------------------------- end to end
def parse(text: str, num_responses: int):
    """Scores in the shown order from the last \\boxed{...}, or None (no box, wrong count, out of 1..10)."""
    boxes = re.findall(r"\\boxed\{([^}]*)\}", text)
    if not boxes:
        return None
    try:
        values = [int(v) for v in boxes[-1].split(",")]
    except ValueError:
        return None
    if len(values) != num_responses or not all(1 <= v <= 10 for v in values):
        return None
    return values


@pytest.fixture(scope="module")
def rft(tmp_path_factory):
    return build_rft_run(tmp_path_factory.mktemp("rft_models"))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_rft_end_to_end(rft):
    out = rft["output_dir"]
    examples = {e.id: e for e in rft_examples()}
    samples = read_jsonl(os.path.join(out, "rft_samples.jsonl"))
    kept = read_jsonl(os.path.join(out, "rft_trajectories.jsonl"))
    with open(os.path.join(out, "rft_counts.json")) as f:
        written = json.load(f)

    by_example: dict = {}
    for s in samples:
        by_example.setdefault(s["id"], []).append(s)
    assert sorted(by_example) == sorted(examples)
    want_counts = dict(ZERO, examples=len(examples), samples=len(samples))
    want_kept = []
    for example_id, group in by_example.items():
        example = examples[example_id]
        unhinted = [s for s in group if not s["hinted"]]
        assert len(unhinted) == 3 and len(group) == 4  # N_RFT = 3, plus one hinted sample
        verdicts = []
        for s in group:
            assert sorted(s["permutation"]) == list(range(example.num_responses))
            assert s["responses"] == [example.responses[i] for i in s["permutation"]]
            shown = parse(s["text"], example.num_responses)
            assert (s["status"] == "OK") == (shown is not None), s
            correct = False
            if shown is not None:
                scores = [None] * example.num_responses
                for position, index in enumerate(s["permutation"]):
                    scores[index] = shown[position]
                assert s["scores"] == scores
                correct = all(scores[example.best] > v for i, v in enumerate(scores) if i != example.best)
            assert s["correct"] == correct, s
            verdicts.append(correct)
            want_counts["unparseable"] += shown is None
        if all(s["correct"] for s in unhinted):
            want_counts["dropped_too_easy"] += 1
            continue
        for s in group:
            key = ("kept" if s["correct"] else "rejected_wrong") if not s["hinted"] else \
                ("kept_hinted" if s["correct"] else "rejected_hinted_wrong")
            want_counts[key] += 1
            if s["correct"]:
                want_kept.append((example_id, s["hinted"], s["text"], s["responses"]))
    assert {k: written[k] for k in want_counts} == want_counts
    # the data exercise every rule: some kept, some wrong, an easy example, unparseable samples
    assert min(written["kept"], written["rejected_wrong"], written["dropped_too_easy"], written["unparseable"]) > 0

    assert [(k["id"], k["hinted"], k["completion"]) for k in kept] == [w[:3] for w in want_kept]
    for row, (example_id, _, _, shown) in zip(kept, want_kept):
        # trained on the prompt without the hint: what the model sees when it scores
        assert row["prompt"] == build_prompt(examples[example_id].query, shown)

    # then SFT on the kept trajectories
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert os.path.isfile(os.path.join(out, "final", "model.safetensors"))
    assert rft["result"].extra["rft_counts"]["kept"] == written["kept"]


def test_rft_model_loads_in_grm(rft):
    from grm_engine import GRM

    grm = GRM.from_pretrained(rft["result"].model_dir, num_kv_blocks=256)
    result = grm.score(rft_examples()[:2], k=1, temperature=0, max_tokens=16)
    assert len(result.examples) == 2
