"""The GRM prompt protocol: what the model reads (METHOD.md, "Pointwise generative reward model").

The words come from a template file (grm_engine/templates.py; the built-in one is
grm_engine/prompt_templates/default.txt, and a checkpoint's own template can be passed instead). The built-in
wording is ours; the structure is the released DeepSeek-GRM one, so its checkpoints work:
responses delimited by `[The Begin of Response i]` ... `[The End of Response i]`, an answer in
three parts headed `Specific Criteria:`, `Analysis:`, `Scores:`, and a last line `\\boxed{s1, s2, ...}`.
"""
from __future__ import annotations

from typing import Sequence, Union

from .templates import resolve_template

Message = dict  # {"role": "user" | "assistant" | "system", "content": str}
Query = Union[str, Sequence[Message]]

TEMPLATES = ("default", "single")  # the built-in names; a template file path works everywhere a name does
# The score range each built-in template asks for: what `parse_scores(lo=, hi=)` should check
# (a PromptTemplate says it as .score_range).
SCORE_RANGE = {"default": (1, 10), "single": (0, 1)}


def _check_query(query: Query) -> None:
    if isinstance(query, str):
        if not query.strip():
            raise ValueError("query is empty")
        return
    if not isinstance(query, (list, tuple)) or not query:
        raise ValueError(f"query must be a string or a non-empty list of chat messages, got {type(query).__name__}")
    for i, message in enumerate(query):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"query[{i}] must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"query[{i}]['role'] = {message['role']!r}; expected system, user or assistant")
        if not isinstance(message["content"], str):
            raise ValueError(f"query[{i}]['content'] must be a string")
    if query[-1]["role"] != "user":
        raise ValueError(f"the last message of the query must be the user's, got role {query[-1]['role']!r}")


def format_conversation(query: Query) -> str:
    """The conversation as plain text; the last turn is the user's query."""
    _check_query(query)
    if isinstance(query, str):
        return f"User: {query}"
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in query)


def _check_responses(responses: Sequence[str]) -> None:
    if isinstance(responses, str) or not isinstance(responses, (list, tuple)) or not responses:
        raise ValueError("responses must be a non-empty list of strings")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise ValueError(f"responses[{i}] is {type(response).__name__}, expected str")


def _last_user_turn(query: Query) -> str:
    return query if isinstance(query, str) else query[-1]["content"]


def format_responses(responses: Sequence[str], *, template="default") -> str:
    """The responses with their delimiters, as the template writes them (`[The Begin of Response i]` ...)."""
    _check_responses(responses)
    return resolve_template(template).render_responses(responses)


def apply_chat_template(messages: Sequence[Message], tokenizer, *, add_generation_prompt: bool) -> str:
    """The tokenizer's chat template when it has one, a plain rendering otherwise."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n\n".join(m["content"] if m["role"] == "user" and len(messages) == 1 else
                       f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    if add_generation_prompt and len(messages) > 1:
        text += "\n\nAssistant:"
    return text


def build_prompt(query: Query, responses: Sequence[str], *, template="default",
                 hint: int | None = None, tokenizer=None) -> str:
    """The GRM's user turn for one query and its responses, in the order given.

    template: "default" (n >= 1 responses, one score 1..10 each), "single" (exactly one response, a binary
    verdict \\boxed{0|1}: the single-response training variant), a template file path ("single:PATH" for its
    single-response section) or a PromptTemplate; see grm_engine/templates.py. hint: the 0-based position
    (in the order given) of the best response; adds the hinted-sampling line.
    With a tokenizer, its chat template is applied (with the generation prompt).
    """
    prompt_template = resolve_template(template)
    conversation = format_conversation(query)
    _check_responses(responses)
    if prompt_template.variant == "single" and len(responses) != 1:
        raise ValueError(f"template {prompt_template.spec!r} takes exactly one response, got {len(responses)}")
    if hint is not None and (not isinstance(hint, int) or not 0 <= hint < len(responses)):
        raise ValueError(f"hint = {hint!r} must be a response position in 0..{len(responses) - 1}")
    prompt = prompt_template.render(prompt_template.variant, conversation, _last_user_turn(query), responses, hint)
    if tokenizer is not None:
        return apply_chat_template([{"role": "user", "content": prompt}], tokenizer, add_generation_prompt=True)
    return prompt


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt built above: a chat template writes its own BOS, plain text gets the tokenizer's
    special tokens. Scoring, the meta RM and training all encode through here, so they see the same tokens."""
    return encode_texts(tokenizer, [text])[0]


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """encode_text for many prompts in one tokenizer call (a fast tokenizer encodes a batch on several threads)."""
    if not texts:
        return []
    special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(list(texts), add_special_tokens=special)["input_ids"]


def build_meta_user_turn(query: Query, responses: Sequence[str], *, template="default") -> str:
    """The meta RM's user turn: the template's `meta` section (query and responses, as the GRM saw them)."""
    _check_responses(responses)
    return resolve_template(template).render("meta", format_conversation(query), _last_user_turn(query), responses)


def build_meta_messages(query: Query, responses: Sequence[str], critique: str, *, template="default") -> list[Message]:
    """The meta RM's conversation: the query and responses as the user turn, the critique as the assistant turn."""
    if not isinstance(critique, str):
        raise ValueError(f"critique must be a string, got {type(critique).__name__}")
    user = build_meta_user_turn(query, responses, template=template)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": critique}]


def build_meta_prompt(query: Query, responses: Sequence[str], critique: str, *, tokenizer=None,
                      template="default") -> str:
    """The meta RM's input text (METHOD.md): rendered with the tokenizer's chat template when it has one."""
    return apply_chat_template(build_meta_messages(query, responses, critique, template=template), tokenizer,
                               add_generation_prompt=False)
