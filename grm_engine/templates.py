"""Prompt templates: the words the GRM, its single-response variant and the meta RM read, from a text file.

A checkpoint scores best with the exact template it was trained on, so the template is data, not code: the
built-in one (grm_engine/prompt_templates/default.txt, our wording of the DeepSeek-GRM structure) is a file in the
format below, and a user passes their checkpoint's own file (`--template PATH`, `GRM.from_pretrained(...,
template=PATH)`). A file is validated when it is loaded; every error names the file and what to fix.

File format (format 1):
  - Before the first section: empty lines, `#` comment lines, and settings `name = "JSON string"` (JSON, so
    newlines and spaces are exact). Settings (all three required):
      response            one response with its delimiters; {{response}} (required), {{index}} (1-based)
      response_separator  the text between two rendered responses
      hint                the hinted-sampling line, {{best}} (required) = the best response's 1-based position;
                          {{hint}} in a section renders it, or nothing when no hint is asked for
  - Sections, each opened by a line `=== name ===` and running to the next one (trailing empty lines dropped,
    the lines joined by newlines). All three required:
      grm     the GRM's user turn: n >= 1 responses, one score 1..10 each
      single  the single-response variant: one response, a verdict \\boxed{0|1}
      meta    the meta RM's user turn (the GRM's critique follows as the assistant turn)
  - Placeholders are written {{name}}; anything else (single braces included, e.g. \\boxed{x}) is copied as is,
    and a placeholder's value is never expanded again. In the sections:
      {{conversation}}  the whole conversation, one "User: ..." / "Assistant: ..." / "System: ..." block a turn
      {{query}}         the last user turn's text only
      {{responses}}     the responses, each rendered by `response`, joined by `response_separator` (required)
      {{num_responses}} n
      {{score_example}} "s1, s2, ..., sn" (grm, single)
      {{hint}}          see `hint` (grm, single; a hint asked of a template without it is an error)
    Each section needs {{responses}} and at least one of {{conversation}} / {{query}}.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Sequence

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt_templates")
BUILTIN_NAMES = ("default", "single")  # "single" = the built-in file's single-response section
VARIANTS = ("grm", "single")
SCORE_RANGES = {"grm": (1, 10), "single": (0, 1)}

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_SECTION = re.compile(r"^===\s*(\S+)\s*===\s*$")
_SETTING = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
_QUERY_FIELDS = ("conversation", "query")
_PROMPT_FIELDS = {"conversation", "query", "responses", "num_responses", "score_example", "hint"}
# name -> (allowed placeholders, required placeholders)
SECTIONS = {"grm": (_PROMPT_FIELDS, {"responses"}), "single": (_PROMPT_FIELDS, {"responses"}),
            "meta": (_PROMPT_FIELDS - {"score_example", "hint"}, {"responses"})}
SETTINGS = {"response": ({"response", "index"}, {"response"}), "response_separator": (set(), set()),
            "hint": ({"best"}, {"best"})}


class TemplateError(ValueError):
    """A template file that cannot be used: the message names the file, the line or section, and the fix."""


def placeholders(text: str) -> list[str]:
    return _PLACEHOLDER.findall(text)


def _render(text: str, values: dict) -> str:
    # one pass over the template: a value (a response that happens to contain "{{x}}") is never expanded
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded, validated template file and the variant it is used as ("grm" or "single")."""
    name: str  # "default" for the built-in file, else the path as given
    path: str
    sha256: str  # of the file's bytes: what a results file records
    sections: dict = field(repr=False)
    settings: dict = field(repr=False)
    variant: str = "grm"

    @property
    def score_range(self) -> tuple[int, int]:
        """What `parse_scores(lo=, hi=)` should check for this variant's answers."""
        return SCORE_RANGES[self.variant]

    @property
    def spec(self) -> str:
        """The string that resolves to this template again (what the CLI records)."""
        base = self.name
        if self.variant == "single":
            return "single" if base == "default" else f"single:{base}"
        return base

    def with_variant(self, variant: str) -> "PromptTemplate":
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
        return replace(self, variant=variant)

    def render_responses(self, responses: Sequence[str]) -> str:
        return self.settings["response_separator"].join(
            _render(self.settings["response"], {"response": r, "index": str(i)})
            for i, r in enumerate(responses, start=1))

    def render(self, section: str, conversation: str, query: str, responses: Sequence[str],
               hint: int | None = None) -> str:
        """One section filled in. hint: 0-based position of the best response, or None."""
        text = self.sections[section]
        if hint is not None and "hint" not in placeholders(text):
            raise TemplateError(f"template {self.path}: section '{section}' has no {{{{hint}}}} placeholder, so a "
                                "hinted prompt cannot be built; add {{hint}} where the hint line belongs")
        values = {"conversation": conversation, "query": query, "responses": self.render_responses(responses),
                  "num_responses": str(len(responses)),
                  "score_example": ", ".join(f"s{i}" for i in range(1, len(responses) + 1)),
                  "hint": "" if hint is None else _render(self.settings["hint"], {"best": str(hint + 1)})}
        return _render(text, values)


def _check_placeholders(text: str, allowed: set, required: set, where: str, path: str) -> None:
    found = placeholders(text)
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise TemplateError(f"template {path}: {where} has unknown placeholder {{{{{unknown[0]}}}}}"
                            f" (allowed there: {', '.join(sorted(allowed)) or 'none'})")
    missing = sorted(required - set(found))
    if missing:
        raise TemplateError(f"template {path}: {where} is missing the placeholder {{{{{missing[0]}}}}}")


def parse_template(text: str, path: str, *, name: str | None = None) -> PromptTemplate:
    """Validate a template file's text (see the module docstring) -> PromptTemplate (variant "grm")."""
    settings: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        header = _SECTION.match(line)
        if header:
            current = header.group(1)
            if current not in SECTIONS:
                raise TemplateError(f"template {path}, line {number}: unknown section '{current}' "
                                    f"(sections: {', '.join(SECTIONS)})")
            if current in sections:
                raise TemplateError(f"template {path}, line {number}: section '{current}' appears twice")
            sections[current] = []
            continue
        if current is not None:
            sections[current].append(line)
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        setting = _SETTING.match(line)
        if not setting:
            raise TemplateError(f"template {path}, line {number}: before the first section only '#' comments and "
                                f"settings `name = \"JSON string\"` may appear, got {line[:60]!r}")
        key, raw = setting.groups()
        if key not in SETTINGS:
            raise TemplateError(f"template {path}, line {number}: unknown setting '{key}' "
                                f"(settings: {', '.join(SETTINGS)})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TemplateError(f"template {path}, line {number}: the value of '{key}' is not a JSON string "
                                f"({e.msg}); write it in double quotes with \\n for newlines") from None
        if not isinstance(value, str):
            raise TemplateError(f"template {path}, line {number}: the value of '{key}' must be a JSON string")
        if key in settings:
            raise TemplateError(f"template {path}, line {number}: setting '{key}' is given twice")
        settings[key] = value
    for key, (allowed, required) in SETTINGS.items():
        if key not in settings:
            raise TemplateError(f"template {path}: the setting '{key}' is missing (copy it from "
                                f"{os.path.join(BUILTIN_DIR, 'default.txt')})")
        _check_placeholders(settings[key], allowed, required, f"setting '{key}'", path)
    texts = {}
    for key, (allowed, required) in SECTIONS.items():
        if key not in sections:
            raise TemplateError(f"template {path}: the section '=== {key} ===' is missing")
        lines = sections[key]
        while lines and not lines[-1].strip():
            lines.pop()
        texts[key] = "\n".join(lines)
        _check_placeholders(texts[key], allowed, required, f"section '{key}'", path)
        if not set(placeholders(texts[key])) & set(_QUERY_FIELDS):
            raise TemplateError(f"template {path}: section '{key}' is missing the placeholder {{{{conversation}}}} "
                                "(or {{query}})")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return PromptTemplate(name=name or path, path=path, sha256=digest, sections=texts, settings=settings)


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int, name: str) -> PromptTemplate:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TemplateError(f"template {path}: cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"template {path}: not UTF-8 text (byte {e.start})") from None
    return parse_template(text, path, name=name)


def load_template(path: str, *, name: str | None = None) -> PromptTemplate:
    """A template file, validated (TemplateError names the problem); cached while the file is unchanged."""
    path = str(path)
    if not os.path.isfile(path):
        raise TemplateError(f"template {path}: no such file (give 'default', 'single', a template file, or "
                            "single:FILE for a file's single-response section)")
    stat = os.stat(path)
    return _load_cached(path, stat.st_mtime_ns, stat.st_size, name or path)


def builtin_template() -> PromptTemplate:
    return load_template(os.path.join(BUILTIN_DIR, "default.txt"), name="default")


def resolve_template(template="default") -> PromptTemplate:
    """'default' | 'single' | a template file path | 'single:PATH' | a PromptTemplate -> PromptTemplate.
    'single' selects the single-response section (of the built-in file, or of PATH)."""
    if isinstance(template, PromptTemplate):
        return template
    if not isinstance(template, (str, os.PathLike)):
        raise TemplateError(f"template must be 'default', 'single', a file path or a PromptTemplate, "
                            f"got {type(template).__name__}")
    template = os.fspath(template)
    if template == "default":
        return builtin_template()
    if template == "single":
        return builtin_template().with_variant("single")
    if template.startswith("single:"):
        return load_template(template[len("single:"):]).with_variant("single")
    if not os.path.isfile(template) and os.sep not in template and not template.endswith(".txt"):
        raise TemplateError(f"template {template!r} is not 'default', 'single' or an existing template file")
    return load_template(template)
