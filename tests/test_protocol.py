"""build_prompt / build_meta_prompt: the released DeepSeek-GRM structure, chat templates, errors."""
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from grm_engine import build_meta_prompt, build_prompt, parse_scores
from grm_engine.protocol import SCORE_RANGE


def test_prompt_structure_for_two_responses():
    prompt = build_prompt("What is 2+2?", ["4", "five"])
    assert "User: What is 2+2?" in prompt
    blocks = re.findall(r"\[The Begin of Response (\d)\]\n(.*?)\n\[The End of Response (\d)\]", prompt, re.S)
    assert blocks == [("1", "4", "1"), ("2", "five", "2")]
    for header in ("Specific Criteria:", "Analysis:", "Scores:"):
        assert header in prompt
    assert "\\boxed{s1, s2}" in prompt
    assert "best response" not in prompt


def test_prompt_for_chat_history_and_hint():
    query = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "tell a joke"}]
    prompt = build_prompt(query, ["a", "b", "c"], hint=2)
    assert prompt.index("User: hi") < prompt.index("Assistant: hello") < prompt.index("User: tell a joke")
    assert prompt.rstrip().endswith("The best response is: Response 3")
    assert "\\boxed{s1, s2, s3}" in prompt


def test_single_response_variant_asks_for_binary_verdict():
    prompt = build_prompt("q", ["only"], template="single")
    assert "\\boxed{x}" in prompt and "[The Begin of Response 1]" in prompt
    lo, hi = SCORE_RANGE["single"]
    assert parse_scores(["... \\boxed{1}"], 1, lo=lo, hi=hi).status.tolist() == [0]
    # The default template also takes one response, scored 1..10.
    assert "\\boxed{s1}" in build_prompt("q", ["only"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(query="", responses=["a"]), "query is empty"),
    (dict(query="q", responses=[]), "non-empty list"),
    (dict(query="q", responses="ab"), "non-empty list"),
    (dict(query="q", responses=["a", 3]), r"responses\[1\]"),
    (dict(query=[{"role": "assistant", "content": "x"}], responses=["a"]), "last message"),
    (dict(query=[{"content": "x"}], responses=["a"]), r"query\[0\]"),
    (dict(query="q", responses=["a", "b"], template="single"), "exactly one response"),
    (dict(query="q", responses=["a", "b"], template="pairwise"), "template"),
    (dict(query="q", responses=["a", "b"], hint=2), "hint"),
])
def test_bad_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_prompt(kwargs.pop("query"), kwargs.pop("responses"), **kwargs)


def _tokenizer(chat_template=None):
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = chat_template
    return fast


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_applied_when_present():
    plain = build_prompt("q", ["a", "b"])
    templated = build_prompt("q", ["a", "b"], tokenizer=_tokenizer(CHATML))
    assert templated == f"<|im_start|>user\n{plain}<|im_end|>\n<|im_start|>assistant\n"
    assert build_prompt("q", ["a", "b"], tokenizer=_tokenizer(None)) == plain


def test_meta_prompt_has_query_responses_and_critique_as_assistant_turn():
    critique = "Specific Criteria: ...\nAnalysis: ...\nScores: \\boxed{7, 3}"
    text = build_meta_prompt("q?", ["a", "b"], critique, tokenizer=_tokenizer(CHATML))
    user, assistant = text.split("<|im_start|>assistant\n")
    assert user.startswith("<|im_start|>user\nPlease score the responses.")
    assert "[The Begin of Response 2]\nb\n[The End of Response 2]" in user
    assert assistant == critique + "<|im_end|>\n"
    plain = build_meta_prompt("q?", ["a", "b"], critique)
    assert plain.startswith("User: Please score the responses.") and plain.endswith("Assistant: " + critique)
