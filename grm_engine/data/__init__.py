"""Evaluation and training examples: the jsonl schema and its validation (schema.py), the benchmark adapters
(adapters.py) and the file reader (files.py). `load_examples(path, format=..., skip_invalid=...)` is the entry point.
"""
from .adapters import ADAPTERS, FORMATS, PPE_WINNERS, REALMISTAKE_LABELS
from .files import ExampleSet, load_examples
from .schema import ROLES, DataError, Example

__all__ = ["ADAPTERS", "FORMATS", "PPE_WINNERS", "REALMISTAKE_LABELS", "ROLES", "DataError", "Example", "ExampleSet",
           "load_examples"]
