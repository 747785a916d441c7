"""Meta-RM inputs longer than max_length: BOS and the template's head stay, the critique loses its middle and
the responses their ends (meta_rm.encode_meta_input), checked on a byte-level tokenizer that decodes exactly."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from grm_engine.meta_rm import TRUNCATION_MARK, encode_meta_input
from grm_engine.protocol import build_meta_prompt, build_meta_user_turn, encode_text


@pytest.fixture(scope="module")
def tokenizer():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def words(rng, count):
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "x=1;", "{ok}", "é"]) for _ in range(count))


def test_short_inputs_are_the_full_encoding(tokenizer):
    ids = encode_meta_input(tokenizer, "q?", ["a", "b"], "Scores: \\boxed{7, 3}", 10_000)
    assert ids == encode_text(tokenizer, build_meta_prompt("q?", ["a", "b"], "Scores: \\boxed{7, 3}", tokenizer=tokenizer))
    assert ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("seed", range(4))
def test_a_long_critique_loses_its_middle(tokenizer, seed):
    rng = random.Random(seed)
    query, responses = "Which is right? " + words(rng, 5), [words(rng, 8), words(rng, 9)]
    critique = "Specific Criteria: " + words(rng, 400) + "\nScores: \\boxed{7, 3}"
    max_length = rng.randint(600, 900)  # room for the whole user turn and part of the critique
    ids = encode_meta_input(tokenizer, query, responses, critique, max_length)
    assert len(ids) <= max_length and ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(ids[1:])
    user = "User: " + build_meta_user_turn(query, responses)  # the whole user turn is kept (responses are short)
    assert text.startswith(user + "\n\nAssistant: Specific Criteria: ")
    assert text.endswith("\nScores: \\boxed{7, 3}") and TRUNCATION_MARK in text
    assert len(ids) >= max_length - 20  # the budget is used, not thrown away
    # the old rule (keep the last max_length tokens) lost BOS and the query
    full = encode_text(tokenizer, build_meta_prompt(query, responses, critique, tokenizer=tokenizer))
    assert full[-max_length:][0] != tokenizer.bos_token_id


@pytest.mark.parametrize("seed", range(4))
def test_long_responses_lose_their_ends_and_the_critique_stays(tokenizer, seed):
    rng = random.Random(seed)
    query = "Compare them. " + words(rng, 6)
    responses = [f"R{i} " + words(rng, rng.randint(150, 300)) for i in range(rng.randint(2, 4))] + ["short one"]
    critique = "Analysis: fine.\nScores: \\boxed{" + ", ".join(["5"] * len(responses)) + "}"
    max_length = rng.randint(900, 1200)  # the level the responses are cut to stays above the critique
    ids = encode_meta_input(tokenizer, query, responses, critique, max_length)
    assert len(ids) <= max_length and ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(ids[1:])
    head = "User: " + build_meta_user_turn(query, ["\0"]).split("[The Begin of Response 1]")[0]
    assert text.startswith(head) and text.endswith("\n\nAssistant: " + critique)
    for i, response in enumerate(responses, start=1):
        assert f"[The Begin of Response {i}]\n{response[:3]}" in text
    assert "[The Begin of Response %d]\nshort one\n[The End" % len(responses) in text  # short ones stay whole
    assert text.count("[...]") == len(responses) - 1


def test_a_conversation_too_long_for_any_cut_keeps_bos_and_the_end(tokenizer):
    rng = random.Random(7)
    query, critique = words(rng, 900), "Scores: \\boxed{2, 9}"
    ids = encode_meta_input(tokenizer, query, ["a", "b"], critique, 256)
    full = encode_text(tokenizer, build_meta_prompt(query, ["a", "b"], critique, tokenizer=tokenizer))
    assert len(ids) == 256 and ids[:128] == full[:128] and ids[128:] == full[-128:]
