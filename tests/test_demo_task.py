"""The demo task (grm_engine/demo_task.py): examples, critiques, SFT rows, tokenizer and model config.

Critiques are checked against an independent reading of the words (reverse, compare ends and lengths), and
their scores through the project's own parser and correctness rule."""
import json
import re

import pytest
import torch

from grm_engine import VocabBytes, build_prompt, is_correct, load_examples, parse_scores
from grm_engine.demo_task import (ALPHABET, ERROR_TYPES, PRINCIPLES, build_initial_model, build_task_tokenizer, make_sft_rows,
                                  make_task_examples, query_text, shown, tiny_model_config, word_of,
                                  write_critique, write_examples_jsonl, write_rows_jsonl)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo_tokenizer")
    build_task_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))  # what GRM.from_pretrained loads


def test_examples_are_valid_and_labelled():
    examples = make_task_examples(300, seed=3)
    assert len({e.id for e in examples}) == 300
    assert {e.subset for e in examples} == set(ERROR_TYPES)
    assert {e.best for e in examples} == {0, 1}
    for e in examples:
        word = word_of(e.query)
        assert 3 <= len(word) <= 6 and set(word) <= set(ALPHABET)
        right, wrong = e.responses[e.best], e.responses[1 - e.best]
        assert right == word[::-1] and wrong != right
        differs = {"first-letter": wrong[0] != right[0], "last-letter": wrong[-1] != right[-1],
                   "length": len(wrong) != len(right)}
        assert [t for t, d in differs.items() if d] == [e.subset]  # exactly one kind of error
    assert make_task_examples(20, seed=3) == examples[:20]  # seeded


def test_examples_round_trip_through_the_loader(tmp_path):
    examples = make_task_examples(12, seed=0)
    loaded = load_examples(write_examples_jsonl(tmp_path / "ex.jsonl", examples))
    assert [(e.id, e.query, e.responses, e.best, e.subset) for e in loaded] == \
        [(e.id, e.query, e.responses, e.best, e.subset) for e in examples]


def _reference_scores(example, principle):
    """Independent of the module: what each check reads off the word and the responses."""
    word = example.query[len("Reverse the word "):-1]
    reads = {"first": (lambda r: r[0], word[-1]), "last": (lambda r: r[-1], word[0]),
             "length": (lambda r: len(r), len(word))}
    read, expected = reads[principle]
    passed = [read(r) == expected for r in example.responses]
    return [5.0, 5.0] if all(passed) else [9.0 if p else 2.0 for p in passed]


def test_critiques_separate_only_their_error_type():
    examples = make_task_examples(60, seed=4)
    texts, expected, rows = [], [], []
    for e in examples:
        for perm in ([0, 1], [1, 0]):
            view = shown(e, perm)
            for principle in PRINCIPLES:
                texts.append(write_critique(view, principle))
                expected.append(_reference_scores(view, principle))
                rows.append((view, principle))
    parsed = parse_scores(texts, 2)
    assert (parsed.status == 0).all()
    assert parsed.scores.tolist() == expected
    correct = is_correct(parsed.scores, parsed.status, torch.tensor([view.best for view, _ in rows]))
    for ok, (view, principle) in zip(correct.tolist(), rows):
        assert ok == (ERROR_TYPES[PRINCIPLES.index(principle)] == view.subset)


def test_critique_reads_as_a_judgement():
    example = shown(make_task_examples(1, seed=0)[0], [0, 1])
    text = write_critique(example, "length")
    assert text.startswith("\nSpecific Criteria: ") and "\nAnalysis: the word has " in text
    assert text.rstrip().endswith("}") and text.count("\\boxed{") == 1
    with pytest.raises(ValueError, match="principle"):
        write_critique(example, "middle")


def test_sft_rows_are_the_grm_prompts(tmp_path):
    examples = make_task_examples(300, seed=5)
    rows = make_sft_rows(examples, seed=1)
    assert rows == make_sft_rows(examples, seed=1)
    orders, principles = set(), []
    for row, e in zip(rows, examples):
        order = next(o for o in ([0, 1], [1, 0]) if row["prompt"] == build_prompt(e.query, [e.responses[i] for i in o]))
        orders.add(tuple(order))
        assert row["completion"] in [write_critique(shown(e, order), p) for p in PRINCIPLES]
        principles.append(row["completion"].split("\n")[1])
    assert orders == {(0, 1), (1, 0)}
    counts = [principles.count(p) for p in set(principles)]
    assert len(counts) == 3 and min(counts) > 60  # uniform over the three principles
    path = write_rows_jsonl(tmp_path / "sft.jsonl", rows)
    assert [json.loads(line) for line in open(path)] == rows


def test_tokenizer_keeps_letters_and_digits_single_and_the_template_short(tokenizer):
    VocabBytes(tokenizer)  # accepted by the GPU parser's tables (it checks its own decode)
    for symbol in ALPHABET + "0123456789":
        assert len(tokenizer(symbol)["input_ids"]) == 1
    rows = make_sft_rows(make_task_examples(40, seed=6), seed=0)
    for row in rows:
        prompt, completion = tokenizer(row["prompt"])["input_ids"], tokenizer(row["completion"])["input_ids"]
        # the prompt alone is a prefix of prompt + completion: training and scoring see the same tokens
        assert tokenizer(row["prompt"] + row["completion"])["input_ids"] == prompt + completion
        assert len(prompt) <= 64 and len(completion) <= 20
        assert tokenizer.decode(prompt + completion) == row["prompt"] + row["completion"]
        word = word_of(query_from_prompt(row["prompt"]))
        pieces = [tokenizer.decode([i]) for i in prompt]
        assert pieces.count(word[0]) >= 1 and all(len(p) == 1 for p in pieces if set(p) & set(ALPHABET))


def query_from_prompt(prompt: str) -> str:
    return prompt.split("User: ", 1)[1].split("\n", 1)[0]


def test_alphabet_letters_occur_only_in_task_words():
    """No word of the fixed text mixes an alphabet letter with others (the words are the variable slots)."""
    text = "".join(build_prompt(e.query, e.responses, hint=e.best) + write_critique(e, p)
                   for e in make_task_examples(30, seed=0) for p in PRINCIPLES)
    for word in re.findall(r"[A-Za-z]+", text):
        assert not set(word) & set(ALPHABET) or set(word) <= set(ALPHABET), word


def test_model_config_runs_in_our_decoder(tokenizer):
    import transformers as tf

    from grm_engine.decode.models import model_class

    for preset in ("cpu", "gpu"):
        config = tiny_model_config(tokenizer, preset)
        assert not config.tie_word_embeddings and config.vocab_size == len(tokenizer)
        model_class(config)  # a family the decoder supports
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_model_config(tokenizer, "cpu"))
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    with pytest.raises(ValueError, match="preset"):
        tiny_model_config(tokenizer, "tpu")


def test_initial_model_is_a_checkpoint_the_stages_load(tmp_path):
    from grm_engine.grm import check_checkpoint_dir

    build_initial_model(tmp_path / "init")
    check_checkpoint_dir(str(tmp_path / "init"))  # config, safetensors and tokenizer files, a supported family
