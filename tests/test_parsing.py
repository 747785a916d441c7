"""parse_scores: the Python reference against hand-worked cases, and the C++ parser against the
reference on adversarial generated critiques (they must agree exactly, statuses included)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grm_engine import ParseStatus, parse_scores
from grm_engine.parsing import parse_scores_cpp, parse_scores_reference

OK, NO, WRONG, RANGE = ParseStatus.OK, ParseStatus.NO_SCORES, ParseStatus.WRONG_COUNT, ParseStatus.OUT_OF_RANGE

# (text, n, expected status, expected values) worked out by hand from the rule in parsing.py.
CASES = [
    ("Scores: \\boxed{7, 3}", 2, OK, [7, 3]),
    ("\\boxed{1, 2} then later \\boxed{9,8}", 2, OK, [9, 8]),  # last wins
    ("final [[4, 5]]", 2, OK, [4, 5]),
    ("\\boxed{1,2} [[3,4]]", 2, OK, [3, 4]),
    ("[[3,4]] \\boxed{5,6}", 2, OK, [5, 6]),
    ("\\boxed{[[2, 3]]}", 2, OK, [2, 3]),  # the [[ starts last
    ("[[[1,2]]]", 2, OK, [1, 2]),
    ("\\boxed{ 7.5 ,\n 8 }", 2, OK, [7.5, 8]),
    ("\\boxed{+7, 1e1}", 2, OK, [7, 10]),
    ("\\boxed{.5e1, 8.}", 2, OK, [5, 8]),
    ("\\boxed{7}", 1, OK, [7]),
    ("", 2, NO, None),
    ("no scores here", 2, NO, None),
    ("\\boxed{}", 1, NO, None),
    ("\\boxed{7, }", 2, NO, None),
    ("\\boxed{7,,8}", 3, NO, None),
    ("\\boxed{seven, 8}", 2, NO, None),
    ("\\boxed{inf, 8}", 2, NO, None),
    ("\\boxed{1_0, 8}", 2, NO, None),
    ("\\boxed{\uff17, 8}", 2, NO, None),  # full-width digit is not an ASCII number
    ("\\boxed{7,\u00a08}", 2, NO, None),  # non-ASCII space is not stripped
    ("\\boxed{\\frac{1}{2}}", 1, NO, None),  # content up to the first }
    ("\\boxed{{7}}", 1, NO, None),
    ("\\boxed{7, 8", 2, NO, None),  # unclosed: not a group
    ("\\boxed{1, 2} and \\boxed{7, 8", 2, OK, [1, 2]),  # the unclosed one is not a group
    ("[[1, 2]", 2, NO, None),
    ("\\boxed{1, 2, 3}", 2, WRONG, None),
    ("\\boxed{1}", 2, WRONG, None),
    ("\\boxed{0, 5}", 2, RANGE, [0, 5]),
    ("\\boxed{5, 10.5}", 2, RANGE, [5, 10.5]),
    ("\\boxed{-3, 5}", 2, RANGE, [-3, 5]),
    ("\\boxed{1e400, 5}", 2, RANGE, [math.inf, 5]),
    ("\\boxed{" + "9" * 500 + ", 5}", 2, RANGE, [math.inf, 5]),
    ("\\boxed{1, 10}", 2, OK, [1, 10]),
    ("日本語の批評 \\boxed{6, 9} 🎉", 2, OK, [6, 9]),
    ("\ud800 lone surrogate \\boxed{2, 3}", 2, OK, [2, 3]),
]


@pytest.mark.parametrize("parser", [parse_scores_reference, parse_scores_cpp], ids=["reference", "cpp"])
@pytest.mark.parametrize("text,n,status,values", CASES)
def test_hand_worked_cases(parser, text, n, status, values):
    result = parser([text], n)
    assert result.status.dtype == torch.int8 and result.scores.dtype == torch.float32
    assert int(result.status[0]) == status
    if values is None:
        assert torch.isnan(result.scores[0]).all(), "an unparseable critique must never get a score"
    else:
        assert result.scores[0].tolist() == [float(np.float32(v)) for v in values]


def test_ragged_counts_and_padding():
    texts = ["\\boxed{1}", "\\boxed{2, 3, 4}", "\\boxed{5, 6}"]
    result = parse_scores(texts, [1, 3, 2])
    assert result.scores.shape == (3, 3)
    assert result.status.tolist() == [0, 0, 0]
    assert torch.isnan(result.scores[0, 1:]).all() and torch.isnan(result.scores[2, 2:]).all()
    scores, status = result  # unpacks like a tuple
    assert scores is result.scores


def test_custom_range_for_binary_variant():
    result = parse_scores(["\\boxed{0}", "\\boxed{1}", "\\boxed{2}"], 1, lo=0, hi=1)
    assert result.status.tolist() == [OK, OK, RANGE]


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="list of critiques"):
        parse_scores("\\boxed{1}", 1)
    with pytest.raises(ValueError, match="num_responses has 1 entries for 2 texts"):
        parse_scores(["a", "b"], [2])
    with pytest.raises(ValueError, match=r"num_responses\[1\] = 0"):
        parse_scores(["a", "b"], [2, 0])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        parse_scores_cpp(["a", 3], 2)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        parse_scores_reference(["a", 3], 2)


def test_empty_batch():
    for parser in (parse_scores_reference, parse_scores_cpp):
        result = parser([], 2)
        assert result.scores.shape == (0, 2) and result.status.shape == (0,)


# ---- property tests: the C++ parser equals the reference on adversarial critiques ----

_number = st.one_of(
    st.integers(-20, 30).map(str),
    st.floats(-1e3, 1e3, allow_nan=False).map(lambda x: f"{x}"),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: f"{x:e}"),
    st.sampled_from(["7.", ".5", "+3", "-0", "1e1", "1E+1", "2e-1", "9" * 400, "1e400", "1e-400", "e5", "1e", ".",
                     "+", "07", "0x10", "inf", "nan", "1_0", "\uff17", "  8  ", "\n9\t", ""]),
)
_group_body = st.lists(_number, min_size=0, max_size=5).flatmap(
    lambda parts: st.sampled_from([", ", ",", " ,\n", ",,"]).map(lambda sep: sep.join(parts)))
_group = st.one_of(
    _group_body.map(lambda b: "\\boxed{" + b + "}"),
    _group_body.map(lambda b: "[[" + b + "]]"),
    _group_body.map(lambda b: "\\boxed{" + b),  # unclosed
    _group_body.map(lambda b: "[[" + b + "]"),
    _group_body.map(lambda b: "\\boxed{{" + b + "}}"),
    _group_body.map(lambda b: "\\boxed{[[" + b + "]]}"),
)
_noise = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="{}[]\\boxed ,0123456789.e+-\n", max_size=30),
    st.sampled_from(["Scores: ", "\n", "}", "]]", "[[", "\\boxed", "\\boxed{", "日本", "\ud800", "\x00"]),
)
_critique = st.lists(st.one_of(_group, _noise), min_size=0, max_size=8).map("".join)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_critique, min_size=1, max_size=20), n=st.integers(1, 4),
       lo=st.sampled_from([1, 0]), hi=st.sampled_from([10, 1, 100]))
def test_cpp_equals_reference(texts, n, lo, hi):
    ref = parse_scores_reference(texts, n, lo=lo, hi=hi)
    fast = parse_scores_cpp(texts, n, lo=lo, hi=hi)
    assert torch.equal(ref.status, fast.status)
    assert torch.equal(torch.isnan(ref.scores), torch.isnan(fast.scores))
    same = ~torch.isnan(ref.scores)
    assert torch.equal(ref.scores[same], fast.scores[same])
    # -0.0 and 0.0 compare equal; the sign must match too.
    assert torch.equal(torch.signbit(ref.scores[same]), torch.signbit(fast.scores[same]))


def test_cpp_equals_reference_on_large_batches_with_threads():
    rng = np.random.default_rng(0)
    filler = "The first response is accurate but verbose. " * 40  # ~2 KB critiques
    texts, counts = [], []
    for i in range(9000):
        n = int(rng.integers(1, 5))
        values = rng.integers(-1, 12, size=n + int(rng.integers(-1, 2)))
        kind = i % 4
        group = ", ".join(str(v) for v in values)
        tail = {0: f"\\boxed{{{group}}}", 1: f"[[{group}]]", 2: f"\\boxed{{{group}", 3: "no score"}[kind]
        texts.append(filler + tail)
        counts.append(n)
    ref = parse_scores_reference(texts, counts)
    for threads in (1, 2, 3):
        fast = parse_scores_cpp(texts, counts, num_threads=threads)
        assert torch.equal(ref.status, fast.status)
        assert torch.equal(ref.scores.nan_to_num(-99.0), fast.scores.nan_to_num(-99.0))


def test_one_megabyte_critique():
    text = ("x{ [ ] } \\box " * 80_000) + "\\boxed{3, 9}" + "trailing" * 1000
    assert len(text) > 1_000_000
    for parser in (parse_scores_reference, parse_scores_cpp):
        result = parser([text], 2)
        assert result.status.tolist() == [OK] and result.scores[0].tolist() == [3.0, 9.0]
