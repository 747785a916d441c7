"""CPU benchmark: the C++ score parser against the Python reference on 100,000 critiques of ~2 KB.

    pytest bench/test_bench_parse.py --benchmark-only        # pytest-benchmark table
    python bench/test_bench_parse.py                         # one ratio line (recorded in bench/RESULTS.md)
"""
import json
import os
import random
import statistics
import sys
import time

import pytest

from grm_engine.parsing import parse_scores_cpp, parse_scores_reference

NUM_CRITIQUES = int(os.environ.get("GRM_BENCH_CRITIQUES", "100000"))
_SENTENCES = [
    "Response 1 follows the instruction closely and cites the relevant facts.",
    "Response 2 is fluent but misses the second half of the question.",
    "Accuracy (weight 40%): the numbers in the first response are correct.",
    "Helpfulness (weight 30%): both answers are actionable; the second is vaguer.",
    "Safety (weight 10%): neither response contains harmful content.",
    "Clarity (weight 20%): the first response uses a clear step-by-step structure.",
]


def make_critiques(count: int, seed: int = 0):
    """Realistic GRM outputs: criteria, analysis, then a last-line score group (~2 KB each)."""
    rng = random.Random(seed)
    texts, counts = [], []
    for _ in range(count):
        n = rng.choice([2, 2, 2, 3, 4])
        body = " ".join(rng.choice(_SENTENCES) for _ in range(28))
        scores = ", ".join(str(rng.randint(1, 10)) for _ in range(n))
        tail = rng.choice([f"\\boxed{{{scores}}}", f"\\boxed{{{scores}}}", f"[[{scores}]]", "I cannot decide."])
        texts.append(f"Specific Criteria: {body[:600]}\nAnalysis: {body[600:]}\nScores: {tail}")
        counts.append(n)
    return texts, counts


@pytest.fixture(scope="module")
def critiques():
    return make_critiques(NUM_CRITIQUES)


def test_bench_parse_cpp(benchmark, critiques):
    texts, counts = critiques
    benchmark(parse_scores_cpp, texts, counts)


def test_bench_parse_reference(benchmark, critiques):
    texts, counts = critiques
    benchmark.pedantic(parse_scores_reference, args=(texts, counts), rounds=3, iterations=1)


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    texts, counts = make_critiques(NUM_CRITIQUES)
    mean_bytes = sum(len(t.encode()) for t in texts) / len(texts)
    cpp = _median_seconds(lambda: parse_scores_cpp(texts, counts), 7)
    cpp_one_thread = _median_seconds(lambda: parse_scores_cpp(texts, counts, num_threads=1), 7)
    reference = _median_seconds(lambda: parse_scores_reference(texts, counts), 3)
    print(f"{len(texts)} critiques, {mean_bytes:.0f} bytes each, {os.cpu_count()} cores")
    print(f"reference {reference * 1e3:.1f} ms | C++ {cpp * 1e3:.2f} ms ({reference / cpp:.0f}x) | "
          f"C++ 1 thread {cpp_one_thread * 1e3:.2f} ms ({reference / cpp_one_thread:.0f}x)")
    print(json.dumps({"critiques": len(texts), "reference_ms": reference * 1e3, "cpp_ms": cpp * 1e3,
                      "cpp_1thread_ms": cpp_one_thread * 1e3, "ratio": reference / cpp}))
    sys.exit(0)
