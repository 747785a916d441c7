"""The example schema and its validation: Example, DataError and the field checks the adapters share.

Our schema, one JSON object per line:
  id         string or integer, unique in the file (adapters keep the source's ids unchecked)
  query      a string, or chat messages [{"role": "system"|"user"|"assistant", "content": str}, ...]
             ending with a user turn
  responses  a non-empty list of strings
  label, exactly one of:
    best     index of the best response (n >= 2)
    scores   one number per response (n >= 2); the best is the UNIQUE maximum (a tied top is an error)
    label    a number, for a single response (n = 1): a sample is correct iff its score equals it
  subset     optional string (benchmark section / category)
Adapters also set `kind` (not a jsonl field): which part of a benchmark an example is, as the aggregates need it
(rewardbench, ppe-preference, ppe-correctness, rmb-pairwise, rmb-bon, realmistake; None for our jsonl).
`best` and `scores` may both be given if they agree.
Every error is a DataError naming the file, the line (or list item) and the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad example: the message names the file, line (or .json list item) and field, and the fix."""

    def __init__(self, problem: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None, unit: str = "line"):
        self.problem, self.source, self.line, self.field = problem, source, line, field
        where = [str(source) if source else "<example>"]
        if line is not None:
            where.append(f"{unit} {line}")
        if field:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {problem}")


def _is_number(value: Any) -> bool:
    """A finite int or float (an integer beyond float range, e.g. 1 followed by 400 zeros, is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_text(value: str, name: str, error: Callable) -> str:
    """Text a tokenizer can encode: no lone surrogate (JSON allows "\\ud800"; UTF-8 cannot hold it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(name, f"holds a lone surrogate {value[e.start]!r} at character {e.start}, which is not text; "
                    "fix the escape sequence in the file") from None
    return value


@dataclass
class Example:
    """One query with n >= 1 candidate responses and its label (see the module docstring).

    After construction `best` is filled whenever n >= 2 (from `scores` if that was the label given).
    `source`/`line` say where the example came from (line: 1-based jsonl line or .json list item).
    """
    id: str
    query: str | list[dict]
    responses: list[str]
    best: int | None = None
    scores: list[float] | None = None
    label: float | None = None
    subset: str | None = None
    kind: str | None = None  # set by the adapters (module docstring); None for our jsonl
    source: str | None = None
    line: int | None = None
    _unit: str = field(default="line", repr=False, compare=False)

    def __post_init__(self):
        self.id = _check_id(self.id, self._error)
        self.query = _check_query(self.query, self._error)
        self.responses = _check_responses(self.responses, self._error)
        self._check_label()
        if self.subset is not None and not isinstance(self.subset, str):
            raise self._error("subset", f"must be a string, got {type(self.subset).__name__}")
        if self.subset is not None:
            _check_text(self.subset, "subset", self._error)

    num_responses = property(lambda self: len(self.responses))

    def _error(self, field_name: str, problem: str) -> DataError:
        return DataError(problem, source=self.source, line=self.line, field=field_name, unit=self._unit)

    def _check_label(self):
        n = len(self.responses)
        given = [name for name in ("best", "scores", "label") if getattr(self, name) is not None]
        if not given:
            raise self._error("best", "no label: give `best` (index of the best response) or `scores` "
                              "(one per response), or `label` for a single response")
        if "label" in given and len(given) > 1:
            raise self._error("label", "`label` is for one response; do not combine it with best/scores")
        if n == 1:
            if given != ["label"]:
                raise self._error(given[0], "a single response is labelled with `label` (its expected score), "
                                  "not best/scores")
            if isinstance(self.label, bool):
                self.label = int(self.label)
            if not _is_number(self.label):
                raise self._error("label", f"must be a finite number, got {self.label!r}")
            return
        if "label" in given:
            raise self._error("label", f"`label` is for one response, this example has {n}; "
                              "give `best` or `scores` instead")
        best_from_scores = None
        if self.scores is not None:
            best_from_scores = self._check_scores(n)
        if self.best is not None:
            if not isinstance(self.best, int) or isinstance(self.best, bool):
                raise self._error("best", f"must be an integer index, got {self.best!r}")
            if not 0 <= self.best < n:
                raise self._error("best", f"index {self.best} is out of range for {n} responses (0..{n - 1})")
            if best_from_scores is not None and best_from_scores != self.best:
                raise self._error("best", f"best = {self.best} disagrees with scores, whose maximum is "
                                  f"response {best_from_scores}; give one of them")
        else:
            self.best = best_from_scores

    def _check_scores(self, n: int) -> int:
        scores = self.scores
        if not isinstance(scores, (list, tuple)):
            raise self._error("scores", f"must be a list of {n} numbers, got {type(scores).__name__}")
        if len(scores) != n:
            raise self._error("scores", f"has {len(scores)} values for {n} responses; give one per response")
        for i, value in enumerate(scores):
            if not _is_number(value):
                raise self._error(f"scores[{i}]", f"must be a finite number, got {value!r}")
        self.scores = [float(v) for v in scores]
        top = max(self.scores)
        tied = [i for i, v in enumerate(self.scores) if v == top]
        if len(tied) > 1:
            raise self._error("scores", f"the maximum {top:g} is shared by responses {tied}; the best must be "
                              "the unique maximum (fix the scores, or drop them and give `best`)")
        return tied[0]


def _check_id(value: Any, error: Callable) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise error("id", f"must be a string or an integer, got {type(value).__name__}")
    value = _check_text(str(value), "id", error)
    if not value.strip():
        raise error("id", "is empty; give every example a unique id")
    return value


def _check_query(query: Any, error: Callable) -> str | list[dict]:
    if isinstance(query, str):
        if not query.strip():
            raise error("query", "is empty")
        return _check_text(query, "query", error)
    if not isinstance(query, list) or not query:
        raise error("query", "must be a string or a non-empty list of chat messages {role, content}, "
                    f"got {type(query).__name__ if query != [] else 'an empty list'}")
    messages = []
    for i, message in enumerate(query):
        if not isinstance(message, dict):
            raise error(f"query[{i}]", f"must be an object {{role, content}}, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise error(f"query[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise error(f"query[{i}].content", f"must be a string, got {type(content).__name__}")
        _check_text(content, f"query[{i}].content", error)
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise error(f"query[{len(messages) - 1}].role", "the conversation must end with the user's turn "
                    f"(the query being judged), got {messages[-1]['role']!r}")
    return messages


def _check_responses(responses: Any, error: Callable) -> list[str]:
    if not isinstance(responses, (list, tuple)) or not responses:
        raise error("responses", "must be a non-empty list of strings")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise error(f"responses[{i}]", f"must be a string, got {type(response).__name__}")
        if not response.strip():
            raise error(f"responses[{i}]", "is empty; a critique cannot compare an empty response (drop the "
                        "example, or load with skip_invalid)")
        _check_text(response, f"responses[{i}]", error)
    return list(responses)
