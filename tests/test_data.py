"""Example schema validation and benchmark adapters, on small realistic rows in tmp files."""
import json

import pytest

from grm_engine import DataError, Example, load_examples


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = [
    {"id": "a", "query": "What is 2+2?", "responses": ["4", "5"], "best": 0, "subset": "math"},
    {"id": 7, "query": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "responses": ["Hello!", "Go away.", "Hey."], "scores": [3, 9.5, 1]},
    {"id": "c", "query": "Capital of France?", "responses": ["Paris."], "label": 1},
]


def test_valid_rows_load_with_labels_and_locations(tmp_path):
    path = write_jsonl(tmp_path / "good.jsonl", [GOOD[0], "", GOOD[1], "   ", GOOD[2]])
    examples = load_examples(path)
    assert [e.id for e in examples] == ["a", "7", "c"]
    assert [e.line for e in examples] == [1, 3, 5]  # blank lines skipped, numbering kept
    assert all(e.source == str(path) for e in examples)
    assert examples[0].best == 0 and examples[0].subset == "math"
    assert examples[1].best == 1 and examples[1].scores == [3.0, 9.5, 1.0]  # best = unique max of scores
    assert examples[1].query[-1] == {"role": "user", "content": "Hi"}
    assert examples[2].best is None and examples[2].label == 1
    assert examples.skipped == 0


def test_json_list_file_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.json").write_text(json.dumps(GOOD[:2], indent=1))
    write_jsonl(tmp_path / "d" / "two.jsonl", GOOD[2:])
    examples = load_examples(tmp_path / "d")
    assert [e.id for e in examples] == ["a", "7", "c"]
    assert [e.line for e in examples] == [1, 2, 1]
    bad = [dict(GOOD[0]), dict(GOOD[1], best=5)]
    (tmp_path / "bad.json").write_text(json.dumps(bad, indent=2))
    with pytest.raises(DataError, match=r"bad\.json, item 2, field 'best'"):
        load_examples(tmp_path / "bad.json")


def error_for(tmp_path, line):
    """Load a file whose 2nd line is `line`; return the DataError message."""
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD[0], line])
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert info.value.line == 2 and info.value.source == str(path)
    return str(info.value)


@pytest.mark.parametrize("row, field, words", [
    ('{"id": "b", "query": "q", ', None, "not valid JSON"),
    ('[1, 2]', None, "JSON object"),
    ({"query": "q", "responses": ["x", "y"], "best": 0}, "id", "missing"),
    ({"id": "", "query": "q", "responses": ["x", "y"], "best": 0}, "id", "empty"),
    ({"id": "b", "responses": ["x", "y"], "best": 0}, "query", "missing"),
    ({"id": "b", "query": "  ", "responses": ["x", "y"], "best": 0}, "query", "empty"),
    ({"id": "b", "query": 3, "responses": ["x", "y"], "best": 0}, "query", "string or a non-empty list"),
    ({"id": "b", "query": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "responses": ["x", "y"], "best": 0}, "query[1].role", "end with the user"),
    ({"id": "b", "query": [{"role": "human", "content": "q"}], "responses": ["x", "y"], "best": 0},
     "query[0].role", "must be one of"),
    ({"id": "b", "query": [{"role": "user"}], "responses": ["x", "y"], "best": 0}, "query[0].content", "string"),
    ({"id": "b", "query": "q", "best": 0}, "responses", "missing"),
    ({"id": "b", "query": "q", "responses": [], "best": 0}, "responses", "non-empty"),
    ({"id": "b", "query": "q", "responses": ["x", 3], "best": 0}, "responses[1]", "string"),
    ({"id": "b", "query": "q", "responses": ["x", "y"]}, "best", "no label"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "best": 2}, "best", "out of range"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "best": -1}, "best", "out of range"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "best": True}, "best", "integer"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "best": 1.0}, "best", "integer"),
    ({"id": "b", "query": "q", "responses": ["x", "y", "z"], "scores": [7, 7, 2]}, "scores", "unique maximum"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "scores": [7]}, "scores", "one per response"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "scores": [7, "8"]}, "scores[1]", "finite number"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "scores": [7, float("nan")]}, "scores[1]", "finite"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "scores": [7, 8], "best": 0}, "best", "disagrees"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "label": 1}, "label", "one response"),
    ({"id": "b", "query": "q", "responses": ["x"], "best": 0}, "best", "single response"),
    ({"id": "b", "query": "q", "responses": ["x"], "label": "yes"}, "label", "finite number"),
    ({"id": "b", "query": "q", "responses": ["x", "y"], "best": 0, "subset": 3}, "subset", "string"),
    ({"id": "a", "query": "q", "responses": ["x", "y"], "best": 0}, "id", "repeats the id at"),
])
def test_malformed_line_names_line_and_field(tmp_path, row, field, words):
    message = error_for(tmp_path, row if isinstance(row, str) else json.dumps(row))
    assert "line 2" in message and words in message
    if field:
        assert f"field '{field}'" in message


def test_best_and_agreeing_scores_are_accepted(tmp_path):
    row = {"id": "b", "query": "q", "responses": ["x", "y"], "scores": [2, 8], "best": 1}
    assert load_examples(write_jsonl(tmp_path / "x.jsonl", [row]))[0].best == 1


def test_skip_invalid_counts_and_keeps_errors(tmp_path):
    rows = [GOOD[0], "{not json", {"id": "t", "query": "q", "responses": ["x", "y"], "scores": [1, 1]},
            GOOD[1], {"id": "a", "query": "q", "responses": ["x"], "label": 0}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match="line 2"):
        load_examples(path)
    examples = load_examples(path, skip_invalid=True)
    assert [e.id for e in examples] == ["a", "7"]
    assert examples.skipped == 3
    assert [e.line for e in examples.errors] == [2, 3, 5]


def test_all_invalid_or_empty_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"id": 1}', "[]"])
    with pytest.raises(DataError, match="no usable examples.*2 invalid rows"):
        load_examples(path, skip_invalid=True)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="format="):
        load_examples(path, format="csv")


def test_example_constructed_in_memory_is_validated():
    assert Example("z", "q", ["a", "b", "c"], scores=[1, 5, 2]).best == 1
    with pytest.raises(DataError, match="field 'scores'.*unique maximum"):
        Example("z", "q", ["a", "b"], scores=[4, 4])


# --- adapters -------------------------------------------------------------------------------

def test_rewardbench_rows(tmp_path):
    rows = [
        {"prompt": "Write a haiku about rain.", "chosen": "Soft rain on the roof...", "rejected": "Rain is wet.",
         "chosen_model": "gpt-4", "rejected_model": "llama", "subset": "alpacaeval-easy", "id": 30},
        {"prompt": "Compute 3*7.", "chosen": "21", "rejected": "24", "subset": "math-prm", "id": 31},
    ]
    examples = load_examples(write_jsonl(tmp_path / "rb.jsonl", rows), format="rewardbench")
    assert [(e.id, e.subset, e.best) for e in examples] == [("30", "alpacaeval-easy", 0), ("31", "math-prm", 0)]
    assert examples[0].responses == ["Soft rain on the roof...", "Rain is wet."]
    assert examples[1].query == "Compute 3*7."
    del rows[1]["subset"]
    with pytest.raises(DataError, match=r"line 2, field 'subset': is missing"):
        load_examples(write_jsonl(tmp_path / "rb2.jsonl", rows), format="rewardbench")


def test_ppe_human_preference_rows(tmp_path):
    base = {"prompt": "Explain TCP vs UDP.", "response_1": "TCP is reliable...", "response_2": "UDP is fast...",
            "model_a": "m1", "model_b": "m2", "language": "English"}
    rows = [dict(base, question_id="q1", winner="model_a"), dict(base, question_id="q2", winner="model_b"),
            dict(base, question_id="q3", winner="tie"), dict(base, question_id="q4", winner="tie (bothbad)")]
    path = write_jsonl(tmp_path / "ppe.jsonl", rows)
    with pytest.raises(DataError, match=r"line 3, field 'winner'.*tie"):
        load_examples(path, format="ppe")
    examples = load_examples(path, format="ppe", skip_invalid=True)
    assert [(e.id, e.best) for e in examples] == [("q1", 0), ("q2", 1)]
    assert examples[0].responses == ["TCP is reliable...", "UDP is fast..."]
    assert examples.skipped == 2
    write_jsonl(path, [dict(base, question_id="q5", winner="model_c")])
    with pytest.raises(DataError, match="'model_a' or 'model_b'"):
        load_examples(path, format="ppe")
    write_jsonl(path, [dict(base, question_id="q6", winner="model_a", response_2=None)])
    with pytest.raises(DataError, match="field 'response_2': must be a string"):
        load_examples(path, format="ppe")


def test_ppe_correctness_rows_expand_to_conflict_pairs(tmp_path):
    row = {"question_id": "mmlu-17", "model_name": "llama-8b", "prompt": "Which gas is inert? (A) O2 (B) Ar",
           "response_1": "B", "response_2": "A", "response_3": "Answer: A", "response_4": "It is (B)",
           "scores": [True, False, False, True], "sampled_conflict_pairs": [[0, 1], [2, 3], [1, 3]]}
    examples = load_examples(write_jsonl(tmp_path / "corr.jsonl", [row]), format="ppe")
    assert [e.id for e in examples] == ["mmlu-17:llama-8b:0-1", "mmlu-17:llama-8b:2-3", "mmlu-17:llama-8b:1-3"]
    assert [e.responses for e in examples] == [["B", "A"], ["Answer: A", "It is (B)"], ["A", "It is (B)"]]
    assert [e.best for e in examples] == [0, 1, 1]
    assert all(e.line == 1 for e in examples)
    for bad, field in [(dict(row, sampled_conflict_pairs=[[0, 3]]), "sampled_conflict_pairs[0]"),
                       (dict(row, sampled_conflict_pairs=[[0, 1], [0, 9]]), "sampled_conflict_pairs[1]"),
                       (dict(row, scores=[True, False]), "scores"),
                       ({k: v for k, v in row.items() if k != "response_2"}, "response_1")]:
        with pytest.raises(DataError, match=rf"line 1, field '{field}'".replace("[", r"\[").replace("]", r"\]")):
            load_examples(write_jsonl(tmp_path / "c.jsonl", [bad]), format="ppe")


RMB_BON = {"conversation_input": [{"content": "How do I fix a flat tire?", "language": "English", "role": "user"}],
           "bon_best": {"llm_name": "m1", "answer": "Remove the wheel, find the leak..."},
           "loser_list": [{"llm_name": "m2", "answer": "Buy a new car."}, {"llm_name": "m3", "answer": "Call someone."}],
           "bon_uid": "2366", "category_path": "BoN_set/Helpfulness/Chat/Discussion"}
RMB_PAIR = {"pair_uid": "14587", "conversation_input": [{"content": "Say hi", "language": "English", "role": "user"}],
            "chosen": {"llm_name": "m1", "answer": "Hi!", "score": 4.5},
            "reject": {"llm_name": "m2", "answer": "No.", "score": 2.5},
            "category_path": "Pairwise_set/Harmlessness/S1"}


def test_rmb_rows(tmp_path):
    (tmp_path / "S1.json").write_text(json.dumps([RMB_PAIR, RMB_BON], indent=1))
    pair, bon = load_examples(tmp_path / "S1.json", format="rmb")
    assert (pair.id, pair.best, pair.responses) == ("14587", 0, ["Hi!", "No."])
    assert pair.query == [{"role": "user", "content": "Say hi"}] and pair.subset == "Pairwise_set/Harmlessness/S1"
    assert (bon.id, bon.best) == ("2366", 0)
    assert bon.responses == ["Remove the wheel, find the leak...", "Buy a new car.", "Call someone."]
    broken = dict(RMB_BON, loser_list=[{"llm_name": "m2"}])
    (tmp_path / "S2.json").write_text(json.dumps([RMB_PAIR, broken]))
    with pytest.raises(DataError, match=r"S2\.json, item 2, field 'loser_list\[0\]\.answer'"):
        load_examples(tmp_path / "S2.json", format="rmb")
    no_user = dict(RMB_PAIR, conversation_input=[{"role": "assistant", "content": "x"}])
    (tmp_path / "S3.json").write_text(json.dumps([no_user]))
    with pytest.raises(DataError, match=r"field 'conversation_input\[0\]\.role'"):
        load_examples(tmp_path / "S3.json", format="rmb")


def test_raw_unicode_line_separators_inside_strings(tmp_path):
    row = {"id": "u", "query": "a\u2028b\x85c\x0cd", "responses": ["x\u2029y", "z"], "best": 0}
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(dict(row, id="v")) + "\n",
                    encoding="utf-8")
    examples = load_examples(path)
    assert [e.id for e in examples] == ["u", "v"] and examples[0].query == "a\u2028b\x85c\x0cd"
