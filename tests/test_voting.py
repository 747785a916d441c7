"""is_correct / rule_reward / vote against hand-worked cases and a brute-force re-statement of the rules."""
import itertools
import math
import random

import pytest
import torch

from grm_engine import ParseStatus, is_correct, parse_scores, rule_reward, vote

nan = math.nan
OK, NO, WRONG, RANGE = (int(s) for s in ParseStatus)


def test_is_correct_strict_ties_and_statuses():
    scores = torch.tensor([[8, 3, nan], [8, 8, nan], [3, 8, nan], [9, 2, 9], [9, 2, 8], [7, nan, nan], [7, nan, nan],
                           [nan, nan, nan], [0, 5, nan]])
    status = torch.tensor([OK, OK, OK, OK, OK, OK, OK, NO, RANGE], dtype=torch.int8)
    best = torch.tensor([0, 0, 0, 0, 0, 7, 6, 0, 1])  # single-response rows: best holds the label
    expected = [True, False, False, False, True, True, False, False, False]
    assert is_correct(scores, status, best).tolist() == expected
    assert rule_reward(scores, status, best).tolist() == [1.0 if e else -1.0 for e in expected]
    assert rule_reward(scores, status, best).dtype == torch.float32


def test_is_correct_from_parsed_text():
    texts = ["\\boxed{9, 4}", "\\boxed{4, 9}", "\\boxed{6, 6}", "garbage", "\\boxed{9}", "\\boxed{11, 2}"]
    parsed = parse_scores(texts, 2)
    assert rule_reward(parsed.scores, parsed.status, torch.zeros(6, dtype=torch.long)).tolist() == [1, -1, -1, -1, -1, -1]


def test_is_correct_rejects_bad_best():
    with pytest.raises(ValueError, match=r"best\[0\] = 2"):
        is_correct(torch.tensor([[1.0, 2.0]]), torch.tensor([OK]), torch.tensor([2]))


def brute_force_vote(scores, status, perm, n_responses, meta, k_meta):
    """The METHOD.md rule, restated independently: un-shuffle, keep valid (and top-k_meta by meta), sum, unique argmax."""
    groups, k = len(scores), len(scores[0])
    totals, bests = [], []
    for g in range(groups):
        n = n_responses[g]
        valid = [j for j in range(k) if status[g][j] == OK]
        if meta is not None:
            valid = sorted(valid, key=lambda j: (-meta[g][j], j))[:k_meta]
        total = [0.0] * n
        for j in sorted(valid):
            for p in range(n):
                total[perm[g][j][p]] += scores[g][j][p]
        top = max(total)
        bests.append(total.index(top) if total.count(top) == 1 else -1)
        totals.append(total)
    return totals, bests


@pytest.mark.parametrize("seed", range(20))
def test_vote_equals_brute_force(seed):
    rng = random.Random(seed)
    groups, k, n_max = rng.randint(1, 6), rng.randint(1, 9), rng.randint(1, 4)
    n_responses = [rng.randint(1, n_max) for _ in range(groups)]
    scores = [[[float(rng.randint(1, 3)) if p < n_responses[g] else nan for p in range(n_max)] for _ in range(k)]
              for g in range(groups)]
    status = [[rng.choice([OK, OK, OK, NO, WRONG, RANGE]) for _ in range(k)] for _ in range(groups)]
    perm = []
    for g in range(groups):
        rows = []
        for _ in range(k):
            order = list(range(n_responses[g]))
            rng.shuffle(order)
            rows.append(order + list(range(n_responses[g], n_max)))
        perm.append(rows)
    use_meta = seed % 2 == 1
    meta = [[float(rng.randint(0, 3)) for _ in range(k)] for _ in range(groups)] if use_meta else None  # ties on purpose
    k_meta = rng.randint(1, k) if use_meta else None
    result = vote(torch.tensor(scores), torch.tensor(status, dtype=torch.int8), perm=torch.tensor(perm),
                  n_responses=torch.tensor(n_responses), meta=None if meta is None else torch.tensor(meta), k_meta=k_meta)
    totals, bests = brute_force_vote(scores, status, perm, n_responses, meta, k_meta)
    assert result.best.tolist() == bests
    for g in range(groups):
        n = n_responses[g]
        assert result.totals[g, :n].tolist() == totals[g]
        assert torch.isnan(result.totals[g, n:]).all()


def test_vote_unshuffles_and_ties():
    # Two samples; sample 1 showed the responses swapped.
    scores = torch.tensor([[[9.0, 2.0], [2.0, 9.0]]])
    perm = torch.tensor([[[0, 1], [1, 0]]])
    result = vote(scores, torch.tensor([[OK, OK]]), perm=perm)
    assert result.totals.tolist() == [[18.0, 4.0]] and result.best.tolist() == [0]
    # Without un-shuffling, the same numbers tie.
    assert vote(scores, torch.tensor([[OK, OK]])).best.tolist() == [-1]


def test_vote_all_invalid_is_tied():
    scores = torch.full((1, 3, 2), nan)
    result = vote(scores, torch.tensor([[NO, WRONG, NO]]))
    assert result.best.tolist() == [-1] and result.totals.tolist() == [[0.0, 0.0]]
    assert not result.used.any()


def test_vote_meta_filter_prefers_lower_index_on_equal_meta_and_skips_invalid():
    scores = torch.tensor([[[9.0, 1.0], [1.0, 9.0], [1.0, 9.0], [9.0, 1.0]]])
    status = torch.tensor([[OK, OK, OK, NO]])
    meta = torch.tensor([[0.5, 0.5, 0.5, 99.0]])  # the invalid sample has the highest meta score
    result = vote(scores, status, meta=meta, k_meta=1)
    assert result.used.tolist() == [[True, False, False, False]] and result.best.tolist() == [0]
    result = vote(scores, status, meta=meta)  # default k_meta = k // 2 = 2
    assert result.used.tolist() == [[True, True, False, False]] and result.best.tolist() == [-1]


def test_vote_errors_name_the_argument():
    scores = torch.ones(1, 2, 2)
    with pytest.raises(ValueError, match="status must be"):
        vote(scores, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="not a permutation"):
        vote(scores, torch.zeros(1, 2), perm=torch.tensor([[[0, 0], [0, 1]]]))
    with pytest.raises(ValueError, match="k_meta needs meta"):
        vote(scores, torch.zeros(1, 2), k_meta=1)
    with pytest.raises(ValueError, match="k_meta = 3"):
        vote(scores, torch.zeros(1, 2), meta=torch.zeros(1, 2), k_meta=3)


def test_vote_matches_exhaustive_permutations():
    """Every permutation of 3 responses, each scored consistently, always recovers the same winner."""
    true_scores = [4.0, 9.0, 6.0]
    perms = list(itertools.permutations(range(3)))
    shown = torch.tensor([[[true_scores[o] for o in order] for order in perms]])
    result = vote(shown, torch.zeros(1, len(perms), dtype=torch.int8), perm=torch.tensor([perms]))
    assert result.best.tolist() == [1]
    assert result.totals.tolist() == [[4.0 * 6, 9.0 * 6, 6.0 * 6]]
