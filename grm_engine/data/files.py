"""Reading example files: .jsonl or a .json list, or a directory of them, through an adapter (adapters.py) into
validated Examples (schema.py); `load_examples` is the entry point.

Files may be .jsonl (one object a line) or a .json list, UTF-8 (a byte-order mark is allowed); a directory loads
every .json/.jsonl file under it (any case: .JSONL too; sub-folders too, hidden files and folders not).
Every error is a DataError naming the file, the line (or list item) and the field. Blank lines are ignored.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

from .adapters import ADAPTERS
from .schema import DataError, Example


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
