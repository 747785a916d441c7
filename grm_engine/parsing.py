"""Score parsing: critique text -> one score per response.

The rule (the specification every fast path must match exactly):
  1. A score group is `\\boxed{...}` (content up to the first `}`) or `[[...]]` (content up
     to the first `]]`). Among the complete groups in the text, the one that STARTS LAST wins,
     wherever its kind. An unclosed group (a truncated generation) is not a group.
  2. Its content is split on commas; each part, stripped of ASCII whitespace, must be a
     plain decimal number: optional sign, digits with an optional fraction, an optional
     exponent (`7`, `-2`, `7.5`, `.5`, `8.`, `1e1`). Anything else (an empty part, a word,
     `inf`, non-ASCII digits) makes the group unparseable.
  3. Status: NO_SCORES when there is no group or it is unparseable; WRONG_COUNT when the
     number of values differs from the number of responses; OUT_OF_RANGE when any value is
     outside [lo, hi]; OK otherwise. Values are parsed as float64 (correctly rounded) and
     stored as float32. Rows hold the values for OK and OUT_OF_RANGE (the caller may clip),
     NaN everywhere else: a sample that cannot be parsed never gets a score.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ._backends import _C, forced_backend


class ParseStatus(enum.IntEnum):
    OK = 0
    NO_SCORES = 1
    WRONG_COUNT = 2
    OUT_OF_RANGE = 3


@dataclass
class ParsedScores:
    scores: torch.Tensor  # float32 [N, n_max], NaN where absent
    status: torch.Tensor  # int8 [N], ParseStatus values

    def __iter__(self):  # allows `scores, status = parse_scores(...)`
        yield self.scores
        yield self.status


_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_ASCII_WHITESPACE = " \t\n\r\f\v"
_OPENERS = (("\\boxed{", "}"), ("[[", "]]"))


def _last_group(text: str) -> str | None:
    """The content of the complete group that starts last, in linear time: a group of a kind can only start before
    that kind's last closer, so the last opener ending at or before the last closer is the kind's last complete
    group (a regex search from every opener scans to the end for each: quadratic on `[[[[...`)."""
    start, content = -1, None
    for opener, closer in _OPENERS:
        last_close = text.rfind(closer)
        if last_close < 0:
            continue
        begin = text.rfind(opener, 0, last_close)  # the opener must end at or before the closer starts
        if begin > start:
            body = begin + len(opener)
            start, content = begin, text[body:text.find(closer, body)]
    return content


def parse_one(text: str, num_responses: int, lo: float = 1, hi: float = 10) -> tuple[list[float] | None, ParseStatus]:
    """Reference parser for one critique: (values or None, status)."""
    content = _last_group(text)
    if content is None:
        return None, ParseStatus.NO_SCORES
    values = []
    for part in content.split(","):
        part = part.strip(_ASCII_WHITESPACE)
        if not _NUMBER.fullmatch(part):
            return None, ParseStatus.NO_SCORES
        values.append(float(part))
    if len(values) != num_responses:
        return None, ParseStatus.WRONG_COUNT
    if any(not (lo <= v <= hi) for v in values):
        return values, ParseStatus.OUT_OF_RANGE
    return values, ParseStatus.OK


def _normalize_counts(texts: Sequence[str], num_responses) -> tuple[np.ndarray, int]:
    """Per-text response counts [N] and the width n_max of the score matrix."""
    if isinstance(texts, str):
        raise TypeError("parse_scores takes a list of critiques, not one string; wrap it: [text]")
    n = len(texts)
    if isinstance(num_responses, (bool, np.bool_)) or isinstance(num_responses, (float, np.floating)):
        raise TypeError(f"num_responses = {num_responses!r}: give an int (or one int per text), not "
                        f"{type(num_responses).__name__}")
    if isinstance(num_responses, (int, np.integer)):
        counts = np.full(n, int(num_responses), dtype=np.int64)
    else:
        counts = np.asarray(num_responses.cpu() if isinstance(num_responses, torch.Tensor) else num_responses)
        counts = counts.reshape(-1)
        if counts.size and (counts.dtype == np.bool_ or not np.issubdtype(counts.dtype, np.integer)):
            raise TypeError(f"num_responses holds {counts.dtype} values; give one int per text")
        counts = counts.astype(np.int64)
        if counts.shape[0] != n:
            raise ValueError(f"num_responses has {counts.shape[0]} entries for {n} texts")
    if n and counts.min() < 1:
        bad = int(np.argmin(counts))
        raise ValueError(f"num_responses[{bad}] = {counts[bad]}: every critique scores at least one response")
    if isinstance(num_responses, (int, np.integer)):
        if num_responses < 1:
            raise ValueError(f"num_responses = {num_responses}: every critique scores at least one response")
        return counts, int(num_responses)
    return counts, int(counts.max()) if n else 0


def parse_scores_reference(texts: Sequence[str], num_responses, *, lo: float = 1, hi: float = 10) -> ParsedScores:
    counts, n_max = _normalize_counts(texts, num_responses)
    scores = np.full((len(texts), n_max), np.nan, dtype=np.float32)
    status = np.zeros(len(texts), dtype=np.int8)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        values, st = parse_one(text, int(counts[i]), lo, hi)
        status[i] = st
        if values is not None:
            with np.errstate(over="ignore"):  # a huge value becomes inf in float32, as in C++
                scores[i, : len(values)] = values
    return ParsedScores(torch.from_numpy(scores), torch.from_numpy(status))


def parse_scores_cpp(texts: Sequence[str], num_responses, *, lo: float = 1, hi: float = 10,
                     num_threads: int = 0) -> ParsedScores:
    if _C is None:
        raise RuntimeError("grm_engine._C is not built; reinstall grm-engine from source (pip install .)")
    counts, n_max = _normalize_counts(texts, num_responses)
    scores, status = _C.parse_scores(list(texts), counts, n_max, float(lo), float(hi), int(num_threads))
    return ParsedScores(torch.from_numpy(scores), torch.from_numpy(status))


def parse_scores(texts: Sequence[str], num_responses, *, lo: float = 1, hi: float = 10) -> ParsedScores:
    """Parse critiques into scores [N, n_max] (float32, NaN where absent) and status [N] (int8).

    num_responses: an int, or one count per text. See the module docstring for the rule.
    Uses the C++ parser when built (GRM_ENGINE_BACKEND=reference forces the Python one).
    """
    backend = forced_backend()
    if backend == "reference" or _C is None:
        return parse_scores_reference(texts, num_responses, lo=lo, hi=hi)
    return parse_scores_cpp(texts, num_responses, lo=lo, hi=hi)
