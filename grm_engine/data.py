"""Evaluation and training examples: the jsonl schema, its validation, and benchmark adapters.

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
`best` and `scores` may both be given if they agree. Blank lines are ignored.

Adapters (format=...) turn public benchmark rows into the same Example objects; the order of the
responses is deterministic (the best first where the source has no order): shuffling is the scorer's job.
  rewardbench  prompt, chosen, rejected, subset, id            -> [chosen, rejected], best = 0
  ppe          human preference: prompt, response_1, response_2, winner ("model_a" | "model_b";
               a tie is not a label: an error, or skipped with skip_invalid) -> best = 0 or 1
               correctness: prompt, response_1..response_K, scores (K binary), sampled_conflict_pairs
               [[i, j], ...] (0-based) -> one 2-response example per pair, in the pair's order
  rmb          pairwise: conversation_input, chosen, reject     -> [chosen, reject], best = 0
               best-of-N: conversation_input, bon_best, loser_list -> [bon_best, *losers], best = 0
  realmistake  input, llm_response, label ("error" | "no_error"), optional id, task_name -> [llm_response],
               label = 1 for no_error (the response is right: what the single-response \\boxed{1} means), 0 for
               error; ranked by score for ROC-AUC (grm_engine/evaluation.py). Without an id: a hash of the row.
Files may be .jsonl (one object a line) or a .json list, UTF-8 (a byte-order mark is allowed); a directory loads
every .json/.jsonl file under it (any case: .JSONL too; sub-folders too, hidden files and folders not).
Every error is a DataError naming the file, the line (or list item) and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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


# ---------------------------------------------------------------------------------------------
# Row -> Example(s). Each adapter gets a dict and `make(**fields)` (builds an Example at the right
# place) and `error(field, problem)`; it returns a list of examples.

def _require(row: dict, key: str, error: Callable) -> Any:
    if key not in row:
        raise error(key, f"is missing (the row has: {', '.join(sorted(row)) or 'no fields'})")
    return row[key]


def _from_jsonl(row, make, error):
    for key in ("id", "query", "responses"):
        _require(row, key, error)
    return [make(id=row["id"], query=row["query"], responses=row["responses"], best=row.get("best"),
                 scores=row.get("scores"), label=row.get("label"), subset=row.get("subset"))]


def _from_rewardbench(row, make, error):
    fields = {key: _require(row, key, error) for key in ("id", "prompt", "chosen", "rejected", "subset")}
    for key in ("chosen", "rejected"):
        if not isinstance(fields[key], str):
            raise error(key, f"must be a string, got {type(fields[key]).__name__}")
    return [make(id=fields["id"], query=_prompt(fields["prompt"], "prompt", error),
                 responses=[fields["chosen"], fields["rejected"]], best=0, subset=fields["subset"], kind="rewardbench")]


def _prompt(value: Any, name: str, error: Callable):
    """The source's prompt field checked as our `query`; errors name the source's field."""
    return _check_query(value, lambda field_name, problem: error(field_name.replace("query", name, 1), problem))


PPE_WINNERS = {"model_a": 0, "model_b": 1}


def _from_ppe(row, make, error):
    if "winner" in row:
        return _from_ppe_preference(row, make, error)
    if "sampled_conflict_pairs" in row:
        return _from_ppe_correctness(row, make, error)
    raise error("winner", "a PPE row needs `winner` (human preference set) or `scores` + "
                "`sampled_conflict_pairs` (correctness sets)")


def _row_id(row: dict, error: Callable, keys=("question_id", "id")) -> str:
    for key in keys:
        if key in row and row[key] is not None:
            return _check_id(row[key], error)
    raise error(keys[0], f"is missing; the row needs one of {', '.join(keys)}")


def _from_ppe_preference(row, make, error):
    winner = row["winner"]
    if winner not in PPE_WINNERS:
        if isinstance(winner, str) and winner.startswith("tie"):
            raise error("winner", f"is {winner!r}: a tie names no best response, so the row cannot be "
                        "scored; drop ties or load with skip_invalid=True")
        raise error("winner", f"must be 'model_a' or 'model_b', got {winner!r}")
    responses = [_require(row, key, error) for key in ("response_1", "response_2")]
    for key, response in zip(("response_1", "response_2"), responses):
        if not isinstance(response, str):
            raise error(key, f"must be a string, got {type(response).__name__}")
    return [make(id=_row_id(row, error), query=_prompt(_require(row, "prompt", error), "prompt", error),
                 responses=responses, best=PPE_WINNERS[winner], subset=row.get("subset"), kind="ppe-preference")]


_RESPONSE_KEY = re.compile(r"response_([0-9]+)")


def _from_ppe_correctness(row, make, error):
    numbers = sorted(int(m.group(1)) for key in row if (m := _RESPONSE_KEY.fullmatch(key)))
    if not numbers or numbers != list(range(1, len(numbers) + 1)):
        raise error("response_1", f"responses must be response_1..response_K without gaps, found {numbers}")
    responses = [row[f"response_{k}"] for k in numbers]
    for k, response in zip(numbers, responses):
        if not isinstance(response, str):
            raise error(f"response_{k}", f"must be a string, got {type(response).__name__}")
    scores = _require(row, "scores", error)
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise error("scores", f"must be a list with one value per response ({len(responses)})")
    for i, value in enumerate(scores):
        if not (isinstance(value, bool) or _is_number(value)):
            raise error(f"scores[{i}]", f"must be a boolean or number, got {value!r}")
    pairs = row["sampled_conflict_pairs"]
    if not isinstance(pairs, list) or not pairs:
        raise error("sampled_conflict_pairs", "must be a non-empty list of [i, j] index pairs")
    query = _prompt(_require(row, "prompt", error), "prompt", error)
    base_id = _row_id(row, error)
    if row.get("model_name"):
        base_id = f"{base_id}:{row['model_name']}"
    examples = []
    for p, pair in enumerate(pairs):
        name = f"sampled_conflict_pairs[{p}]"
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
            raise error(name, f"must be a pair of integer indices, got {pair!r}")
        i, j = pair
        if not (0 <= i < len(responses) and 0 <= j < len(responses)) or i == j:
            raise error(name, f"{pair!r} must name two different responses in 0..{len(responses) - 1}")
        if float(scores[i]) == float(scores[j]):
            raise error(name, f"{pair!r} is not a conflict pair: both responses score {scores[i]!r}")
        examples.append(make(id=f"{base_id}:{i}-{j}", query=query, responses=[responses[i], responses[j]],
                             best=0 if float(scores[i]) > float(scores[j]) else 1,
                             subset=row.get("subset", row.get("domain")), kind="ppe-correctness"))
    return examples


def _answer(value: Any, name: str, error: Callable) -> str:
    if isinstance(value, dict):
        value = value.get("answer")
        name = f"{name}.answer"
    if not isinstance(value, str):
        raise error(name, f"must be a string (or an object with a string `answer`), got {type(value).__name__}")
    return value


def _from_rmb(row, make, error):
    query = _prompt(_require(row, "conversation_input", error), "conversation_input", error)
    subset = row.get("category_path", row.get("subset"))
    if "bon_best" in row:
        losers = _require(row, "loser_list", error)
        if not isinstance(losers, list) or not losers:
            raise error("loser_list", "must be a non-empty list of responses")
        responses = [_answer(row["bon_best"], "bon_best", error)]
        responses += [_answer(loser, f"loser_list[{i}]", error) for i, loser in enumerate(losers)]
        return [make(id=_row_id(row, error, ("bon_uid", "id")), query=query, responses=responses,
                     best=0, subset=subset, kind="rmb-bon")]
    if "chosen" in row:
        responses = [_answer(row["chosen"], "chosen", error), _answer(_require(row, "reject", error), "reject", error)]
        return [make(id=_row_id(row, error, ("pair_uid", "id")), query=query, responses=responses,
                     best=0, subset=subset, kind="rmb-pairwise")]
    raise error("chosen", "an RMB row needs `chosen` + `reject` (pairwise) or `bon_best` + `loser_list` (best-of-N)")


REALMISTAKE_LABELS = {"no_error": 1, "error": 0}


def _from_realmistake(row, make, error):
    query = _prompt(_require(row, "input", error), "input", error)
    response = _require(row, "llm_response", error)
    if not isinstance(response, str):
        raise error("llm_response", f"must be a string, got {type(response).__name__}")
    label = _require(row, "label", error)
    if label not in REALMISTAKE_LABELS:
        raise error("label", f"must be 'error' or 'no_error', got {label!r}")
    if row.get("id") is not None:
        example_id = _row_id(row, error, ("id",))
    else:  # stable across runs and row order (ids key the sampling seeds)
        example_id = "rm-" + hashlib.sha256(json.dumps([row["input"], response]).encode()).hexdigest()[:16]
    return [make(id=example_id, query=query, responses=[response], label=REALMISTAKE_LABELS[label],
                 subset=row.get("task_name", row.get("subset")), kind="realmistake")]


ADAPTERS = {"jsonl": _from_jsonl, "rewardbench": _from_rewardbench, "ppe": _from_ppe, "rmb": _from_rmb,
            "realmistake": _from_realmistake}


# ---------------------------------------------------------------------------------------------
# Files

class ExampleSet(list):
    """A list of Examples that also says how many rows were skipped (skip_invalid=True) and why."""

    def __init__(self, examples=(), skipped: int = 0, errors: list[DataError] | None = None):
        super().__init__(examples)
        self.skipped = skipped
        self.errors = errors or []


def _json(text: str, one_line: bool = False):
    """json.loads, with every way it can fail on bad input as a ValueError: a JSONDecodeError, an integer of
    more than 4,300 digits (ValueError), brackets nested too deep for the parser (RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"column {e.colno}" if one_line else f"line {e.lineno}, column {e.colno}"
        raise ValueError(f"is not valid JSON ({e.msg} at {where})") from None
    except RecursionError:
        raise ValueError("is not usable JSON (brackets nested too deep)") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(f"is not usable JSON (a number with more than {sys.get_int_max_str_digits()} digits; "
                         "write long ids as strings)" if "digits" in str(e) else f"is not usable JSON ({e})") from None


def _rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(number, unit, row or DataError) for each row: a file that is not .jsonl and starts with '[' is a JSON list
    and gives items, anything else lines.
    A UTF-8 byte-order mark at the start is dropped; a jsonl line that is not UTF-8 or not JSON is a DataError for
    that line (skip_invalid can drop it)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot be read ({e.strerror})", source=str(path)) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if path.suffix.lower() != ".jsonl" and data.lstrip()[:1] == b"[":  # a .jsonl file is lines, whatever line 1 is
        try:
            rows = _json(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})", source=str(path),
                            line=data.count(b"\n", 0, e.start) + 1) from None
        except ValueError as e:
            raise DataError(str(e), source=str(path)) from None
        if not isinstance(rows, list):
            raise DataError("starts with '[' but is not a JSON list", source=str(path))
        for number, row in enumerate(rows, start=1):
            yield number, "item", row
        return
    # split on "\n" only: str.splitlines would also cut at U+2028, U+0085 or form feeds that JSON
    # strings may hold raw (jsonl written with ensure_ascii=False); "\n" never occurs inside a UTF-8 sequence
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, "line", DataError(f"is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})",
                                            source=str(path), line=number)
            continue
        try:
            yield number, "line", _json(line, one_line=True)
        except ValueError as e:
            yield number, "line", DataError(f"{e}; each line must hold one JSON object", source=str(path), line=number)


def _files(path: Path) -> list[Path]:
    if path.is_dir():  # benchmark trees nest (RMB: set/goal/category/*.json): every level, any case of the suffix,
        # nothing hidden (editors' and our own temp files start with a dot)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".json", ".jsonl") and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError("is a directory with no .json or .jsonl files", source=str(path))
        return files
    if not path.is_file():
        raise DataError("does not exist (give a .jsonl file, a .json list or a directory of them)",
                        source=str(path))
    return [path]


def load_examples(path, *, format: str = "jsonl", skip_invalid: bool = False) -> ExampleSet:
    """Load and validate examples; see the module docstring for the schema and the formats.

    A bad row raises DataError (file, line, field) unless skip_invalid=True, which drops it and counts it
    in the result's `.skipped` (the errors are kept in `.errors`). The result is a list of Example.
    """
    if format not in ADAPTERS:
        raise ValueError(f"format={format!r}: expected one of {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[format]
    result = ExampleSet()
    first_line_of_id: dict[str, tuple[str, int]] = {}
    for file in _files(Path(path)):
        for number, unit, row in _rows(file):
            def error(field_name, problem, _number=number, _unit=unit):
                return DataError(problem, source=str(file), line=_number, field=field_name, unit=_unit)

            def make(_number=number, _unit=unit, **fields):
                return Example(**fields, source=str(file), line=_number, _unit=_unit)
            try:
                if isinstance(row, DataError):
                    raise row
                if not isinstance(row, dict):
                    raise error(None, f"must be a JSON object, got {type(row).__name__}")
                examples = adapter(row, make, error)
                for example in examples if format == "jsonl" else ():
                    if example.id in first_line_of_id:
                        where = "%s %s" % first_line_of_id[example.id]
                        raise error("id", f"{example.id!r} repeats the id at {where}; ids must be unique")
            except DataError as e:
                if not skip_invalid:
                    raise
                result.skipped += 1
                result.errors.append(e)
                continue
            for example in examples:
                first_line_of_id[example.id] = (f"{file}, {unit}", number)
            result.extend(examples)
    if not result:
        detail = f" ({result.skipped} invalid rows skipped; first: {result.errors[0]})" if result.skipped else ""
        raise DataError(f"holds no usable examples{detail}", source=str(path))
    return result
