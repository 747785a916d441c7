"""The demo's verifiable preference task: judge two attempts at reversing a word.

The query asks to reverse a word of 3-6 letters over an 8-letter alphabet; the right response is the word
reversed, the wrong one errs in exactly one way: its first letter, its last letter, or its length (a letter
inserted or dropped inside, so both ends stay right). The GRM answers with one principle (which check to run),
the check's working, and the scores:

    Specific Criteria: a reversal starts with the word's last letter.
    Analysis: the word ends with K; Response 1 starts with K (right), Response 2 starts with M (wrong).
    Scores: \\boxed{9, 2}

Each check is a copy (a letter or a length read off the prompt), so a tiny model learns it, but each separates
only one error type: a check both responses pass gives them equal scores (5, 5). That is what makes the paper's
mechanisms visible at this size (DESIGN.md, "The demo task"): SFT on critiques whose principle is drawn at
random teaches the format and the checks but not which check to choose (greedy ~ 1/3 strictly correct), voting
over sampled principles accumulates evidence (one separating critique outweighs any number of ties), a meta RM
can learn to trust the separating critiques, and RFT / GRPO can teach the choice of principle.

The tokenizer is a byte-level BPE built here whose merges cover the fixed template and critique text (a prompt
is 46-56 tokens, not ~850 characters; a critique is 17) while the task's letters and every digit stay one token
each: they are split off before BPE, so no merge can ever swallow them.
"""
from __future__ import annotations

import json
import random
from typing import Sequence

from .data import Example
from .protocol import build_prompt

# Letters that occur nowhere in the template or critique text (checked in tests): they are single tokens in
# every context, and a word reads as a code rather than as English.
ALPHABET = "DGHKMPWZ"
MIN_LENGTH, MAX_LENGTH = 3, 6
ERROR_TYPES = ("first-letter", "last-letter", "length")  # Example.subset
PRINCIPLES = ("first", "last", "length")  # the check each principle runs; PRINCIPLES[i] separates ERROR_TYPES[i]
MATCH, MISMATCH, TIE = 9, 2, 5

_CRITERIA = {
    "first": "a reversal starts with the word's last letter.",
    "last": "a reversal ends with the word's first letter.",
    "length": "a reversal has as many letters as the word.",
}


def query_text(word: str) -> str:
    return f"Reverse the word {word}."


def word_of(query: str) -> str:
    """The word a query_text asks to reverse."""
    prefix, suffix = "Reverse the word ", "."
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"not a demo-task query: {query!r}")
    return query[len(prefix):-len(suffix)]


def _other_letter(rng: random.Random, letter: str) -> str:
    return rng.choice([c for c in ALPHABET if c != letter])


def wrong_reversal(rng: random.Random, word: str, error: str) -> str:
    """The word reversed with one error of the given type (ERROR_TYPES)."""
    right = word[::-1]
    if error == "first-letter":
        return _other_letter(rng, right[0]) + right[1:]
    if error == "last-letter":
        return right[:-1] + _other_letter(rng, right[-1])
    if error == "length":  # both ends stay right: only the length check can see it
        if len(right) > MIN_LENGTH and rng.random() < 0.5:
            cut = rng.randrange(1, len(right) - 1)
            return right[:cut] + right[cut + 1:]
        place = rng.randrange(1, len(right))
        return right[:place] + rng.choice(ALPHABET) + right[place:]
    raise ValueError(f"error type {error!r} is not one of {ERROR_TYPES}")


def make_task_examples(count: int, seed: int) -> list[Example]:
    """`count` examples: 2 responses in random order, `best` the right one, subset = the wrong one's error type
    (cycled, so the three types are equally common). Ids `rev{seed}-{i}` are unique for a seed."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LENGTH, MAX_LENGTH)))
        error = ERROR_TYPES[i % len(ERROR_TYPES)]
        right, wrong = word[::-1], wrong_reversal(rng, word, error)
        best = rng.randrange(2)
        responses = [right, wrong] if best == 0 else [wrong, right]
        examples.append(Example(id=f"rev{seed}-{i}", query=query_text(word), responses=responses, best=best,
                                subset=error))
    return examples


def write_examples_jsonl(path, examples: Sequence[Example]) -> str:
    """The examples in the schema grm_engine.data reads."""
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"id": e.id, "query": e.query, "responses": e.responses, "best": e.best,
                                "subset": e.subset}) + "\n")
    return str(path)


def _check_value(principle: str, text: str):
    """What a check reads: the first letter, the last letter or the length of a response."""
    return {"first": text[0], "last": text[-1], "length": len(text)}[principle]


def write_critique(example: Example, principle: str) -> str:
    """The correct critique of `example`, with its responses in the order shown, under one principle.

    The working reads the check's expected value off the word, then each response's value with its verdict
    (one comparison per response, next to the value: a tiny model learns that far faster than comparing three
    values at the scores). Scores (shown order): 9 for a response that passes the check and 2 for one that
    fails it; 5 each when both pass (the check cannot separate them). Ends with the boxed scores (the trainer appends EOS)."""
    if principle not in PRINCIPLES:
        raise ValueError(f"principle {principle!r} is not one of {PRINCIPLES}")
    if example.num_responses != 2:
        raise ValueError(f"example {example.id!r}: the demo task has 2 responses, got {example.num_responses}")
    word = word_of(example.query)
    expected = {"first": word[-1], "last": word[0], "length": len(word)}[principle]
    values = [_check_value(principle, r) for r in example.responses]
    passed = [v == expected for v in values]
    scores = [TIE, TIE] if all(passed) else [MATCH if p else MISMATCH for p in passed]
    verdicts = [" (right)" if p else " (wrong)" for p in passed]
    if principle == "length":
        working = (f"the word has {expected} letters; Response 1 has {values[0]}{verdicts[0]}, "
                   f"Response 2 has {values[1]}{verdicts[1]}.")
    else:
        verb = "starts" if principle == "first" else "ends"
        word_verb = "ends" if principle == "first" else "starts"
        working = (f"the word {word_verb} with {expected}; Response 1 {verb} with {values[0]}{verdicts[0]}, "
                   f"Response 2 {verb} with {values[1]}{verdicts[1]}.")
    return (f"\nSpecific Criteria: {_CRITERIA[principle]}\nAnalysis: {working}\n"
            f"Scores: \\boxed{{{scores[0]}, {scores[1]}}}")


def shown(example: Example, perm: Sequence[int]) -> Example:
    """The example with its responses in the shown order perm (perm[p] = original index at position p)."""
    return Example(id=example.id, query=example.query, responses=[example.responses[i] for i in perm],
                   best=list(perm).index(example.best), subset=example.subset)


def make_sft_rows(examples: Sequence[Example], seed: int) -> list[dict]:
    """One SFT row per example: the prompt exactly as the GRM sees it (default template) for a random order of
    the responses, and a correct critique under a principle drawn uniformly (the model learns the format and
    the checks, not which check to choose)."""
    rng = random.Random(seed)
    rows = []
    for example in examples:
        perm = [0, 1] if rng.random() < 0.5 else [1, 0]
        view = shown(example, perm)
        rows.append({"prompt": build_prompt(view.query, view.responses, tokenizer=None),
                     "completion": write_critique(view, rng.choice(PRINCIPLES))})
    return rows


def write_rows_jsonl(path, rows: Sequence[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


# ---- tokenizer and model --------------------------------------------------------------------------------------
def _tokenizer_corpus() -> list[str]:
    """Prompts (both orders, with and without the hint) and critiques under every principle: the fixed text."""
    corpus = []
    for i, example in enumerate(make_task_examples(30, seed=-1)):
        for perm in ([0, 1], [1, 0]):
            view = shown(example, perm)
            corpus.append(build_prompt(view.query, view.responses, hint=view.best if i % 3 == 0 else None))
            corpus += [write_critique(view, principle) for principle in PRINCIPLES]
    return corpus


def build_task_tokenizer(path=None, vocab_size: int = 1024):
    """A byte-level BPE for the task (saved to `path` when given); grm_engine.VocabBytes accepts it.

    Pre-tokenization: every line starts a piece ("\\n" merged with what follows), and each alphabet letter and
    each digit is a piece of its own, so they stay single tokens; merges run across spaces (use_regex=False),
    so the fixed text of a line collapses into a few tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(f"[{ALPHABET}0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


PRESETS = {
    # ~0.6M parameters besides the embeddings: the prototype's size (DESIGN.md, "The demo task")
    "cpu": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4),
    "gpu": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=4),
}


def tiny_model_config(tokenizer, preset: str = "cpu"):
    """A Llama config over `tokenizer`'s vocabulary (untied embeddings; contexts of 256 tokens)."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {tuple(PRESETS)}")
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **PRESETS[preset])


def build_initial_model(path, preset: str = "cpu", seed: int = 0):
    """The task tokenizer and a randomly initialised tiny Llama, saved together in `path` (the SFT stage's
    `model`); returns (tokenizer, model)."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_task_tokenizer(path)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_model_config(tokenizer, preset))
    model.save_pretrained(str(path))
    return tokenizer, model
