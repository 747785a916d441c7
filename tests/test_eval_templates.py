"""Prompt templates (grm_engine/templates.py): the built-in file reproduces the wording build_prompt had before
templates existed (a frozen copy below is the reference), a user's file is used as written, and a bad file is
refused on load with its name and the placeholder or section at fault."""
import random

import pytest

from grm_engine import build_meta_prompt, build_prompt
from grm_engine.protocol import format_conversation
from grm_engine.templates import BUILTIN_DIR, TemplateError, load_template, resolve_template

# ---- the reference: build_prompt / build_meta_prompt's text as of commit 595699a (before templates) ----
_INSTRUCTION = (
    "You are an expert evaluator of assistant responses. Read the conversation below (its last turn is "
    "the user's query) and the candidate responses. First write the specific criteria that matter for "
    "this query, each with a weight; then analyse every response against those criteria; then give "
    "each response one overall score."
)
_FORMAT_DEFAULT = (
    "Answer in exactly three parts:\n"
    "Specific Criteria: the criteria for this query and their weights.\n"
    "Analysis: a critique of each response against the criteria.\n"
    "Scores: one integer from 1 to 10 per response (higher is better), in the order the responses "
    "appear above, written on the last line as \\boxed{{{example}}}."
)
_FORMAT_SINGLE = (
    "Answer in exactly three parts:\n"
    "Specific Criteria: the criteria for this query and their weights.\n"
    "Analysis: a critique of the response against the criteria.\n"
    "Scores: 1 if the response is correct and acceptable, 0 otherwise, written on the last line as \\boxed{x}."
)


def _reference_responses(responses):
    return "\n\n".join(f"[The Begin of Response {i}]\n{r}\n[The End of Response {i}]"
                       for i, r in enumerate(responses, start=1))


def reference_prompt(query, responses, template="default", hint=None):
    if template == "single":
        output_format = _FORMAT_SINGLE
    else:
        output_format = _FORMAT_DEFAULT.format(example=", ".join(f"s{i}" for i in range(1, len(responses) + 1)))
    parts = [_INSTRUCTION, "#### Conversation ####\n" + format_conversation(query),
             "#### Responses to be Scored ####\n" + _reference_responses(responses),
             "#### Output Format ####\n" + output_format]
    if hint is not None:
        parts.append(f"The best response is: Response {hint + 1}")
    return "\n\n".join(parts)


def reference_meta_user(query, responses):
    return "\n\n".join(["Please score the responses.", "#### Conversation ####\n" + format_conversation(query),
                        "#### Responses to be Scored ####\n" + _reference_responses(responses)])


def _text(rng, braces=True):
    alphabet = "ab cd\n{}[]\\xyz" if braces else "ab cd\nxyz"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) + "{{responses}}" * (rng.random() < 0.2)


def _query(rng):
    if rng.random() < 0.5:
        return "q " + _text(rng)
    turns = [{"role": rng.choice(["system", "user", "assistant"]), "content": _text(rng)} for _ in range(rng.randint(0, 3))]
    return turns + [{"role": "user", "content": _text(rng)}]


def test_builtin_template_reproduces_the_old_prompts_exactly():
    rng = random.Random(0)
    for _ in range(200):
        query, n = _query(rng), rng.randint(1, 5)
        responses = [_text(rng) for _ in range(n)]
        hint = rng.choice([None, rng.randrange(n)])
        assert build_prompt(query, responses, hint=hint) == reference_prompt(query, responses, hint=hint)
        assert build_prompt(query, responses, template="default", hint=hint) == \
            build_prompt(query, responses, template=f"{BUILTIN_DIR}/default.txt", hint=hint)
        one = responses[:1]
        assert build_prompt(query, one, template="single", hint=hint and 0) == \
            reference_prompt(query, one, "single", hint=hint and 0)
        critique = _text(rng)
        meta = build_meta_prompt(query, responses, critique)
        assert meta == f"User: {reference_meta_user(query, responses)}\n\nAssistant: {critique}"


GOOD = '''# a user's template
response = "<r{{index}}>{{response}}</r{{index}}>"
response_separator = "\\n"
hint = " (hint: {{best}})"

=== grm ===
Q: {{query}} / {{num_responses}} answers
{{responses}}
Answer \\boxed{{{score_example}}}{{hint}}

=== single ===
{{conversation}}
{{responses}} -> \\boxed{x}

=== meta ===
M {{conversation}} {{responses}}


'''


def test_a_user_template_is_used_as_written(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(GOOD)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "why {{query}}?"}]
    prompt = build_prompt(conversation, ["a", "b {{hint}}"], template=str(path), hint=1)
    assert prompt == ("Q: why {{query}}? / 2 answers\n<r1>a</r1>\n<r2>b {{hint}}</r2>\n"
                      "Answer \\boxed{s1, s2} (hint: 2)")
    assert build_prompt("q", ["a"], template=f"single:{path}") == "User: q\n<r1>a</r1> -> \\boxed{x}"
    assert build_meta_prompt("q", ["a"], "C", template=str(path)) == "User: M User: q <r1>a</r1>\n\nAssistant: C"
    template = resolve_template(str(path))
    assert template.score_range == (1, 10) and resolve_template(f"single:{path}").score_range == (0, 1)
    assert template.sha256 != resolve_template("default").sha256
    path.write_text(GOOD.replace("Q:", "Query:"))  # an edited file is reloaded, with a new hash
    assert resolve_template(str(path)).sha256 != template.sha256


@pytest.mark.parametrize("edit,needles", [
    (("{{num_responses}}", "{{n}}"), ["unknown placeholder {{n}}", "section 'grm'"]),
    (("<r{{index}}>{{response}}", "<r{{index}}>"), ["setting 'response'", "missing the placeholder {{response}}"]),
    (("{{best}}", "{{index}}"), ["setting 'hint'", "unknown placeholder {{index}}"]),
    (("M {{conversation}} {{responses}}", "M {{conversation}}"), ["section 'meta'", "{{responses}}"]),
    (("{{conversation}}\n{{responses}} ->", "{{responses}} ->"), ["section 'single'", "{{conversation}}"]),
    (("=== meta ===", "=== judge ==="), ["line", "unknown section 'judge'"]),
    (("=== meta ===\nM {{conversation}} {{responses}}", ""), ["section '=== meta ===' is missing"]),
    (('response_separator = "\\n"', "response_separator = '\\n'"), ["line 3", "not a JSON string"]),
    (('response_separator = "\\n"', ""), ["setting 'response_separator' is missing"]),
    (("# a user's template", "hello"), ["line 1", "only '#' comments"]),
])
def test_bad_template_files_are_named(tmp_path, edit, needles):
    path = tmp_path / "bad.txt"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(TemplateError) as error:
        load_template(str(path))
    for needle in [str(path), *needles]:
        assert needle in str(error.value), (needle, str(error.value))


def test_hint_needs_the_placeholder_and_specs_are_checked(tmp_path):
    path = tmp_path / "nohint.txt"
    path.write_text(GOOD.replace("{{hint}}", ""))
    assert build_prompt("q", ["a", "b"], template=str(path)).endswith("\\boxed{s1, s2}")
    with pytest.raises(TemplateError, match="no {{hint}} placeholder"):
        build_prompt("q", ["a", "b"], template=str(path), hint=0)
    for spec in ("pairwise", str(tmp_path / "missing.txt"), "single:" + str(tmp_path / "missing.txt")):
        with pytest.raises(TemplateError, match="template"):
            resolve_template(spec)
