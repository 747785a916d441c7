"""Benchmark adapters: each turns a public benchmark's rows (format=...) into Examples of our schema (schema.py);
the order of the responses is deterministic (the best first where the source has no order): shuffling is the
scorer's job.
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
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable

from .schema import _check_id, _check_query, _is_number

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
FORMATS = tuple(ADAPTERS)  # the --format choices
