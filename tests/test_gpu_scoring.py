"""Token-id score parsing, vote and rule reward kernels vs the references.

CPU lane: the kernels' per-sequence / per-group code (csrc/cuda/*_core.cuh, plain C++ that the
kernels run per warp / per thread) compiled for the host with g++ and run on the same cases.
GPU lane (pytest -m gpu): grm_engine._cuda through grm_engine.gpu_scoring on the same cases.
Reference: parse_scores(tokenizer.batch_decode(ids, skip_special_tokens=True,
clean_up_tokenization_spaces=False)) and grm_engine.voting.
"""
from __future__ import annotations

import ctypes
import os
import random
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

from grm_engine.parsing import parse_scores_reference
from grm_engine.vocab_bytes import VocabBytes
from grm_engine.voting import is_correct, rule_reward, vote
from test_vocab_bytes import FAMILIES, random_group, random_ids, segment

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")

HARNESS = r"""
#include "score_parser_core.cuh"
#include "vote_core.cuh"
using namespace grm_cuda;

extern "C" void parse_rows(const int32_t* entries, const uint8_t* flags, const uint8_t* blob, int64_t vocab_size,
                           const int64_t* ids, int64_t rows, int64_t row_stride, const int32_t* lengths,
                           const int32_t* num_responses, double lo, double hi, float* scores, int64_t n_max,
                           int8_t* status) {
  VocabView vocab{entries, flags, blob, vocab_size};
  for (int64_t r = 0; r < rows; ++r) {  // the kernel's row body, with loops for the warp ballots
    TokenSequence<int64_t> seq{vocab, ids + r * row_stride, lengths[r]};
    for (int i = 0; i < seq.length && seq.first_kept < 0; ++i)
      if (!seq.skipped(i)) seq.first_kept = i;
    auto prev = [&](int j) { for (int i = j - 1; i >= 0; --i) if (seq.flags(i) & kFlagDelimiter) return i; return -1; };
    float* out = scores + r * n_max;
    for (int64_t c = 0; c < n_max; ++c) out[c] = quiet_nan();
    status[r] = parse_token_sequence(seq, prev, num_responses[r], lo, hi, out);
  }
}

extern "C" void vote_groups(int64_t groups, int k, int n_max, const float* scores, const int8_t* status,
                            const int32_t* perm, const int32_t* n_responses, const float* meta, int k_meta,
                            float* totals, bool* used, int64_t* best, int32_t* errors) {
  const int64_t kn = int64_t(k) * n_max;
  for (int64_t g = 0; g < groups; ++g)
    errors[g] = vote_group(k, n_max, n_responses ? n_responses[g] : n_max, scores + g * kn, status + g * k,
                           perm ? perm + g * kn : nullptr, meta ? meta + g * k : nullptr, k_meta,
                           totals + g * n_max, used + g * k, best + g);
}

extern "C" void reward_rows(int64_t rows, int n_max, const float* scores, const int8_t* status, const double* best,
                            const int64_t* counts, bool* correct, int32_t* errors) {
  for (int64_t r = 0; r < rows; ++r)
    errors[r] = correct_row(scores + r * n_max, n_max, status[r], best[r], counts ? counts[r] : -1, correct + r);
}
"""


# -- case generators (shared by both lanes) --------------------------------------------------------
def planted_cases(vocab: VocabBytes, seed: int):
    """Rows of ids with score groups split at every byte boundary, decoys and padding past lengths."""
    rng = random.Random(seed)
    rows, counts = [], []
    for group_index in range(6):
        count = rng.randint(1, 3)
        group = (random_group(rng, count) if group_index % 2 else clean_group(rng, count)).encode()
        for cut in range(0, len(group) + 1):
            before = random_ids(rng, vocab, rng.choice([0, 0, 3, 10]))
            if rng.random() < 0.3:  # an earlier complete group that must lose to the later one
                before += segment(rng, vocab, random_group(rng, count).encode())
            after = random_ids(rng, vocab, rng.choice([0, 1, 4]))
            rows.append(before + segment(rng, vocab, group, cut if 0 < cut < len(group) else None) + after)
            counts.append(count)
    for token in range(vocab.vocab_size):  # tokens that read differently when first (Metaspace)
        if vocab.first_bytes[token] != vocab.token_bytes[token] and vocab.flags[token]:
            specials = [int(i) for i in np.flatnonzero(vocab.special)][:1]
            rows += [[token] + random_ids(rng, vocab, 2), specials + [token], random_ids(rng, vocab, 1) + [token]]
            counts += [2, 2, 2]
    for _ in range(60):  # plain random ids: mostly no group
        rows.append(random_ids(rng, vocab, rng.randint(0, 40)))
        counts.append(rng.randint(1, 3))
    return rows, counts


def clean_group(rng: random.Random, count: int) -> str:
    values = ", ".join(rng.choice(["7", "8", "10", "1", "5.5", "9.", "2e0"]) for _ in range(count))
    return rng.choice(["\\boxed{%s}", "[[%s]]", " \\boxed{ %s }"]) % values


def pad_rows(rows, vocab: VocabBytes, seed: int, dtype=np.int64):
    """[N, L] ids with garbage past each length (delimiters included), and lengths [N]."""
    rng = random.Random(seed)
    width = max(len(r) for r in rows) + 3
    brace = vocab.token_bytes.index(b"}") if b"}" in vocab.token_bytes else 0
    ids = np.empty((len(rows), width), dtype=dtype)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        ids[i, len(row):] = [rng.choice([brace, rng.randrange(vocab.vocab_size)]) for _ in range(width - len(row))]
    return ids, np.array([len(r) for r in rows], dtype=np.int32)


def expected_parse(tokenizer, rows, counts, lo=1, hi=10):
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return parse_scores_reference(texts, counts, lo=lo, hi=hi)


def number_texts(seed: int) -> list[str]:
    """Numbers whose float64 rounding is hard: long digit strings, halfway cases, extremes."""
    rng = random.Random(seed)
    values = ["7", "-0", "+0.0", "0.1", "1e1", "8.", ".5", "9007199254740993", "9007199254740992.5", "1e23",
              "2.2250738585072011e-308", "2.2250738585072012e-308", "4.9406564584124654e-324", "2.4703282292062328e-324",
              "2.4703282292062327e-324", "1.7976931348623157e308", "1.7976931348623159e308", "1e-400", "1e400",
              "0." + "0" * 400 + "1", "1" + "0" * 400, "7." + "0" * 300 + "1", "123456789012345678901234567890",
              "1.00000000000000011102230246251565404236316680908203125", "3.4028235677973366e38", "1e0000000000000000001",
              "0.30000000000000004", "6.103515625e-05", "1.0000000596046448", "1.00000005960464477539062501"]
    for _ in range(150):
        x = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        if x == x and abs(x) != float("inf"):
            values.append(repr(x))
        values.append("".join(rng.choice("0123456789") for _ in range(rng.randint(15, 40))) + "e" + str(rng.randint(-330, 300)))
        values.append(f"{rng.randint(1, 10)}.{rng.randint(0, 10**rng.randint(1, 25))}")
    return [f"\\boxed{{{v}}}" for v in values]


def single_byte_vocab() -> VocabBytes:
    """A 256-token vocabulary where token i is byte i (so ids are the text's bytes)."""
    vocab = VocabBytes.__new__(VocabBytes)
    vocab.vocab_size = 256
    vocab.token_bytes = [bytes([i]) for i in range(256)]
    vocab.first_bytes = list(vocab.token_bytes)
    vocab.special = np.zeros(256, dtype=bool)
    vocab.unknown = np.zeros(256, dtype=bool)
    vocab.byte_token = np.zeros(256, dtype=bool)
    vocab.lossy_utf8, vocab.text_strip = False, None
    vocab._pack()
    vocab._device_tables = {}
    return vocab


def random_vote_inputs(seed: int, device="cpu"):
    """Ties, all-invalid groups, ragged n, permutations, meta ties; scores on a coarse grid."""
    g = torch.Generator().manual_seed(seed)
    groups, k, n_max = 64, 6, 4
    scores = (torch.randint(1, 5, (groups, k, n_max), generator=g) * 0.5).float()
    status = torch.randint(0, 4, (groups, k), generator=g).to(torch.int8)
    status[torch.rand(groups, k, generator=g) < 0.5] = 0
    status[:4] = 1  # all-invalid groups
    n_responses = torch.randint(1, n_max + 1, (groups,), generator=g)
    perm = torch.stack([torch.stack([torch.cat([torch.randperm(int(n_responses[i]), generator=g),
                                                torch.arange(int(n_responses[i]), n_max)]) for _ in range(k)])
                        for i in range(groups)])
    meta = torch.randint(0, 3, (groups, k), generator=g).float()  # many equal meta scores
    return [t.to(device) for t in (scores, status, perm, n_responses, meta)]


# -- CPU lane: the kernels' core compiled for the host ------------------------------------------
@pytest.fixture(scope="module")
def host_core(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    folder = tmp_path_factory.mktemp("core")
    (folder / "harness.cpp").write_text(HARNESS)
    library = folder / "harness.so"
    subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{CSRC}", str(folder / "harness.cpp"),
                    "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


def _ptr(array: np.ndarray):
    return ctypes.c_void_p(array.ctypes.data) if array is not None else None


def host_parse(core, vocab: VocabBytes, ids: np.ndarray, lengths: np.ndarray, counts, lo=1.0, hi=10.0):
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int32)
    n_max = int(counts.max())
    scores = np.full((len(ids), n_max), 7.0, dtype=np.float32)  # poison
    status = np.full(len(ids), 99, dtype=np.int8)
    entries, flags, blob = (vocab.entries.numpy(), vocab.flags.numpy(), vocab.blob.numpy())
    core.parse_rows(_ptr(entries), _ptr(flags), _ptr(blob), ctypes.c_int64(vocab.vocab_size), _ptr(ids),
                    ctypes.c_int64(len(ids)), ctypes.c_int64(ids.shape[1]), _ptr(lengths), _ptr(counts),
                    ctypes.c_double(lo), ctypes.c_double(hi), _ptr(scores), ctypes.c_int64(n_max), _ptr(status))
    return torch.from_numpy(scores), torch.from_numpy(status)


def assert_same_parse(got_scores, got_status, want):
    assert got_status.cpu().tolist() == want.status.tolist()
    assert torch.equal(got_scores.cpu().contiguous().view(torch.int32), want.scores.view(torch.int32))  # bits, NaN included


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_host_core_parses_planted_groups(host_core, name):
    tokenizer = FAMILIES[name]()
    vocab = VocabBytes(tokenizer)
    rows, counts = planted_cases(vocab, seed=len(name))
    ids, lengths = pad_rows(rows, vocab, seed=1)
    want = expected_parse(tokenizer, rows, counts)
    assert (want.status == 0).sum() > 20 and (want.status == 1).sum() > 20
    assert_same_parse(*host_parse(host_core, vocab, ids, lengths, counts), want)


def test_host_core_number_rounding(host_core):
    vocab = single_byte_vocab()
    texts = number_texts(seed=3)
    rows = [list(t.encode()) for t in texts]
    ids, lengths = pad_rows(rows, vocab, seed=2)
    want = parse_scores_reference(texts, 1, lo=-1e300, hi=1e300)
    assert_same_parse(*host_parse(host_core, vocab, ids, lengths, [1] * len(rows), lo=-1e300, hi=1e300), want)


def fuzz_texts(seed: int, count: int) -> list[str]:
    """Random strings of parser-relevant pieces: nested, unclosed and overlapping groups."""
    rng = random.Random(seed)
    pieces = ["\\boxed{", "\\boxed", "{", "}", "[[", "[", "]", "]]", ",", ", ", " ", "\n", "\t", "7", "10", "3.5",
              ".", "e", "E", "-", "+", "1e1", "x", "\\", "b", "oxed{", "é", "9", "0"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(count)]


def test_host_core_fuzzed_texts(host_core):
    vocab = single_byte_vocab()
    texts = fuzz_texts(seed=11, count=4000)
    counts = [1 + i % 3 for i in range(len(texts))]
    rows = [list(t.encode()) for t in texts]
    ids, lengths = pad_rows(rows, vocab, seed=12)
    want = parse_scores_reference(texts, counts)
    assert len(set(want.status.tolist())) == 4  # every status occurs
    assert_same_parse(*host_parse(host_core, vocab, ids, lengths, counts), want)


def host_vote(core, scores, status, perm, n_responses, meta, k_meta):
    groups, k, n_max = scores.shape
    arrays = [np.ascontiguousarray(x) for x in (scores.numpy(), status.numpy())]
    perm_np = None if perm is None else np.ascontiguousarray(perm.numpy().astype(np.int32))
    n_np = None if n_responses is None else np.ascontiguousarray(n_responses.numpy().astype(np.int32))
    meta_np = None if meta is None else np.ascontiguousarray(meta.numpy().astype(np.float32))
    totals = np.full((groups, n_max), 5.0, dtype=np.float32)
    used = np.zeros((groups, k), dtype=bool)
    best = np.full(groups, 77, dtype=np.int64)
    errors = np.full(groups, 9, dtype=np.int32)
    core.vote_groups(ctypes.c_int64(groups), k, n_max, _ptr(arrays[0]), _ptr(arrays[1]), _ptr(perm_np), _ptr(n_np),
                     _ptr(meta_np), int(k_meta or 0), _ptr(totals), _ptr(used), _ptr(best), _ptr(errors))
    assert not errors.any()
    return torch.from_numpy(totals), torch.from_numpy(best), torch.from_numpy(used)


@pytest.mark.parametrize("variant", ["plain", "perm", "meta1", "meta_half", "meta_k"])
def test_host_core_vote_matches_reference(host_core, variant):
    scores, status, perm, n_responses, meta = random_vote_inputs(seed=len(variant))
    k = scores.shape[1]
    kwargs = {"plain": {}, "perm": dict(perm=perm, n_responses=n_responses),
              "meta1": dict(perm=perm, n_responses=n_responses, meta=meta, k_meta=1),
              "meta_half": dict(meta=meta), "meta_k": dict(meta=meta, k_meta=k)}[variant]
    want = vote(scores, status, **kwargs)
    k_meta = kwargs.get("k_meta", max(1, k // 2) if "meta" in kwargs else 0)
    totals, best, used = host_vote(host_core, scores, status, kwargs.get("perm"), kwargs.get("n_responses"),
                                   kwargs.get("meta"), k_meta)
    assert torch.equal(totals.view(torch.int32), want.totals.view(torch.int32))
    assert best.tolist() == want.best.tolist() and used.tolist() == want.used.tolist()
    assert (want.best == -1).sum() >= 4 and (want.best >= 0).sum() > 10  # ties and winners both occur


def random_reward_case(seed: int, rows: int, n_max: int):
    """Ragged rows (1..n_max responses, NaN past n) of small scores (ties), 60% OK statuses, and a best index
    (the label for one-response rows): scores [rows, n_max], counts [rows], status [rows], best [rows]."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(1, 4, (rows, n_max), generator=g).float()
    counts = torch.randint(1, n_max + 1, (rows,), generator=g)
    scores[torch.arange(n_max)[None, :] >= counts[:, None]] = float("nan")
    status = torch.randint(0, 4, (rows,), generator=g).to(torch.int8)
    status[torch.rand(rows, generator=g) < 0.6] = 0
    best = torch.where(counts == 1, torch.randint(1, 4, (rows,), generator=g), torch.randint(0, 3, (rows,), generator=g) % counts)
    return scores, counts, status, best


def test_host_core_rule_reward_matches_reference(host_core):
    rows, n_max = 300, 3
    scores, counts, status, best = random_reward_case(5, rows, n_max)
    for num_responses in (None, counts):
        want_correct = is_correct(scores, status, best, num_responses=num_responses)
        correct = np.zeros(rows, dtype=bool)
        errors = np.zeros(rows, dtype=np.int32)
        counts_np = None if num_responses is None else counts.numpy().astype(np.int64)
        best_np = best.numpy().astype(np.float64)
        host_core.reward_rows(ctypes.c_int64(rows), n_max, _ptr(np.ascontiguousarray(scores.numpy())),
                              _ptr(status.numpy()), _ptr(best_np), _ptr(counts_np), _ptr(correct), _ptr(errors))
        assert not errors.any() and correct.tolist() == want_correct.tolist()
        assert 20 < int(want_correct.sum()) < rows - 20
    assert rule_reward(scores, status, best).tolist() == torch.where(want_correct, 1.0, -1.0).tolist()


# -- GPU lane -----------------------------------------------------------------------------------
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_gpu_parse_matches_decode_then_parse(name, id_dtype):
    from grm_engine.gpu_scoring import parse_scores_from_tokens

    tokenizer = FAMILIES[name]()
    vocab = VocabBytes(tokenizer)
    rows, counts = planted_cases(vocab, seed=10 + len(name))
    ids, lengths = pad_rows(rows, vocab, seed=3)
    want = expected_parse(tokenizer, rows, counts)
    got = parse_scores_from_tokens(torch.from_numpy(ids).to("cuda", id_dtype), torch.from_numpy(lengths).cuda(), vocab,
                                   torch.tensor(counts).cuda())
    assert got.scores.is_cuda
    assert_same_parse(got.scores, got.status, want)


@gpu
def test_gpu_parse_numbers_and_long_rows():
    from grm_engine.gpu_scoring import parse_scores_from_tokens

    vocab = single_byte_vocab()
    texts = number_texts(seed=4)
    texts += fuzz_texts(seed=12, count=2000)
    texts += ["x" * 3000 + "[[1, 2]]" + "y" * 500, "\\boxed{3}" + "z" * 5000, "[[" + "1," * 2000 + "1]]"]
    rows = [list(t.encode()) for t in texts]
    ids, lengths = pad_rows(rows, vocab, seed=5)
    want = parse_scores_reference(texts, 1, lo=-1e300, hi=1e300)
    got = parse_scores_from_tokens(torch.from_numpy(ids).cuda(), torch.from_numpy(lengths).cuda(), vocab, 1,
                                   lo=-1e300, hi=1e300)
    assert_same_parse(got.scores, got.status, want)


@gpu
@pytest.mark.parametrize("variant", ["plain", "perm", "meta1", "meta_half", "meta_k"])
def test_gpu_vote_matches_reference(variant):
    from grm_engine.gpu_scoring import vote_cuda

    scores, status, perm, n_responses, meta = random_vote_inputs(seed=20 + len(variant))
    k = scores.shape[1]
    kwargs = {"plain": {}, "perm": dict(perm=perm, n_responses=n_responses),
              "meta1": dict(perm=perm, n_responses=n_responses, meta=meta, k_meta=1),
              "meta_half": dict(meta=meta), "meta_k": dict(meta=meta, k_meta=k)}[variant]
    want = vote(scores, status, **kwargs)
    got = vote_cuda(scores.cuda(), status.cuda(), **{key: v.cuda() if isinstance(v, torch.Tensor) else v
                                                    for key, v in kwargs.items()})
    assert torch.equal(got.totals.cpu().view(torch.int32), want.totals.view(torch.int32))
    assert got.best.cpu().tolist() == want.best.tolist() and got.used.cpu().tolist() == want.used.tolist()


@gpu
def test_gpu_vote_rejects_bad_permutation():
    from grm_engine.gpu_scoring import vote_cuda

    scores, status, perm, n_responses, meta = random_vote_inputs(seed=1, device="cuda")
    n_responses[3] = perm.shape[2]  # every position of group 3 is checked
    perm[3, 2, 0] = perm[3, 2, 1]
    with pytest.raises(ValueError, match=r"perm\[3\]"):
        vote_cuda(scores, status, perm=perm, n_responses=n_responses)


@gpu
def test_gpu_rule_reward_matches_reference():
    from grm_engine.gpu_scoring import is_correct_cuda, rule_reward_cuda

    rows, n_max = 4000, 3
    scores, counts, status, best = random_reward_case(9, rows, n_max)
    for num_responses in (None, counts):
        want = rule_reward(scores, status, best, num_responses=num_responses)
        got = rule_reward_cuda(scores.cuda(), status.cuda(), best.cuda(),
                               num_responses=None if num_responses is None else num_responses.cuda())
        assert got.cpu().tolist() == want.tolist()
        assert is_correct_cuda(scores.cuda(), status.cuda(), best.cuda()).cpu().tolist() == \
            is_correct(scores, status, best).tolist()


@gpu
def test_gpu_tokens_to_advantages_stays_on_device():
    """Parse -> reward on the GPU equals the CPU path, for a GRPO-style batch."""
    from grm_engine.gpu_scoring import parse_scores_from_tokens, rule_reward_cuda

    tokenizer = FAMILIES["byte_level"]()
    vocab = VocabBytes(tokenizer)
    rows, counts = planted_cases(vocab, seed=77)
    counts = [2] * len(rows)
    ids, lengths = pad_rows(rows, vocab, seed=8)
    labels = torch.tensor([i % 2 for i in range(len(rows))])
    parsed = parse_scores_from_tokens(torch.from_numpy(ids).cuda(), torch.from_numpy(lengths).cuda(), vocab, 2)
    got = rule_reward_cuda(parsed.scores, parsed.status, labels.cuda())
    want_parsed = expected_parse(tokenizer, rows, counts)
    assert got.cpu().tolist() == rule_reward(want_parsed.scores, want_parsed.status, labels).tolist()


def test_parse_scores_from_tokens_cpu_tensors_use_the_reference():
    from grm_engine import parse_scores_from_tokens

    tokenizer = FAMILIES["llama2"]()
    vocab = VocabBytes(tokenizer)
    rows, counts = planted_cases(vocab, seed=5)
    ids, lengths = pad_rows(rows, vocab, seed=6)
    got = parse_scores_from_tokens(torch.from_numpy(ids), torch.from_numpy(lengths), vocab, torch.tensor(counts))
    assert_same_parse(got.scores, got.status, expected_parse(tokenizer, rows, counts))


class HostExtension:
    """Stands in for grm_engine._cuda on the CPU with the host-compiled cores, so the Python glue
    in grm_engine/gpu_scoring.py (dtypes, argument order, error reporting) is tested here too."""

    def __init__(self, core):
        self.core = core

    def parse_scores_from_tokens(self, token_ids, lengths, counts, entries, flags, blob, n_max, lo, hi):
        assert lengths.dtype == counts.dtype == torch.int32 and entries.dtype == torch.int32
        vocab = VocabBytes.__new__(VocabBytes)
        vocab.entries, vocab.flags, vocab.blob, vocab.vocab_size = entries, flags, blob, entries.shape[0]
        scores, status = host_parse(self.core, vocab, token_ids.numpy().astype(np.int64), lengths.numpy(),
                                    counts.numpy(), lo, hi)
        return scores[:, :n_max], status

    def vote(self, scores, status, perm, n_responses, meta, k_meta):
        assert scores.dtype == torch.float32 and status.dtype == torch.int8
        groups, k, n_max = scores.shape
        totals = np.zeros((groups, n_max), dtype=np.float32)
        used = np.zeros((groups, k), dtype=bool)
        best = np.zeros(groups, dtype=np.int64)
        errors = np.zeros(groups, dtype=np.int32)
        arrays = [None if t is None else np.ascontiguousarray(t.numpy()) for t in (scores, status, perm, n_responses, meta)]
        self.core.vote_groups(ctypes.c_int64(groups), k, n_max, *[_ptr(a) for a in arrays[:4]], _ptr(arrays[4]),
                              k_meta, _ptr(totals), _ptr(used), _ptr(best), _ptr(errors))
        return torch.from_numpy(totals), torch.from_numpy(best), torch.from_numpy(used), torch.from_numpy(errors)

    def rule_reward(self, scores, status, best, counts):
        assert best.dtype == torch.float64 and (counts is None or counts.dtype == torch.int64)
        rows, n_max = scores.shape
        correct = np.zeros(rows, dtype=bool)
        errors = np.zeros(rows, dtype=np.int32)
        arrays = [None if t is None else np.ascontiguousarray(t.numpy()) for t in (scores, status, best, counts)]
        self.core.reward_rows(ctypes.c_int64(rows), n_max, *[_ptr(a) for a in arrays], _ptr(correct), _ptr(errors))
        correct = torch.from_numpy(correct)
        return correct, torch.where(correct, 1.0, -1.0).float(), torch.from_numpy(errors)


def test_python_glue_with_host_extension(host_core, monkeypatch):
    from grm_engine import gpu_scoring

    monkeypatch.setattr(gpu_scoring, "_cuda", HostExtension(host_core))
    tokenizer = FAMILIES["gemma"]()
    vocab = VocabBytes(tokenizer)
    rows, counts = planted_cases(vocab, seed=12)
    ids, lengths = pad_rows(rows, vocab, seed=13)
    got = gpu_scoring.parse_scores_cuda(torch.from_numpy(ids).int(), torch.from_numpy(lengths).long(), vocab, counts)
    assert_same_parse(got.scores, got.status, expected_parse(tokenizer, rows, counts))

    scores, status, perm, n_responses, meta = random_vote_inputs(seed=3)
    want = vote(scores, status, perm=perm, n_responses=n_responses, meta=meta, k_meta=2)
    result = gpu_scoring.vote_cuda(scores.double(), status.long(), perm=perm, n_responses=n_responses, meta=meta,
                                   k_meta=2)
    assert torch.equal(result.totals.view(torch.int32), want.totals.view(torch.int32))
    assert result.best.tolist() == want.best.tolist() and result.used.tolist() == want.used.tolist()
    n_responses[3] = perm.shape[2]
    perm[3, 1, 0] = perm[3, 1, 1]
    with pytest.raises(ValueError, match=r"perm\[3\]"):
        gpu_scoring.vote_cuda(scores, status, perm=perm, n_responses=n_responses)

    parsed = parse_scores_reference(["[[7, 3]]", "[[3, 7]]", "[[7, 7]]", "nothing", "\\boxed{1}"], [2, 2, 2, 2, 1])
    labels = torch.tensor([0, 0, 0, 0, 1])
    assert gpu_scoring.rule_reward_cuda(parsed.scores, parsed.status, labels).tolist() == [1.0, -1.0, -1.0, -1.0, 1.0]
    assert gpu_scoring.rule_reward_cuda(parsed.scores, parsed.status, labels).tolist() == \
        rule_reward(parsed.scores, parsed.status, labels).tolist()
    with pytest.raises(ValueError, match=r"best\[1\]"):
        gpu_scoring.is_correct_cuda(parsed.scores, parsed.status, torch.tensor([0, 5, 0, 0, 1]))
