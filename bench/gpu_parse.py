"""GPU section `parse`: token ids -> scores -> votes on the GPU, side by side with the CPU path.

Shape (issue 4): 65,536 generated critiques of 1,024 tokens (int32 ids on the GPU), a byte-level
BPE vocabulary of 151,645 tokens (Qwen-sized, built locally), groups of k = 8 samples scoring
n = 2 shuffled responses. The critique ends with `\\boxed{a, b}` near its length (800..1,024),
as GRM outputs do; a second case has no group anywhere, so every row is scanned in full.
CPU path: copy ids to host + tokenizer.batch_decode + C++ parser (parse_scores_cpp) + reference
vote, timed once on a slice and scaled linearly (the row says how); peer: the same with the
tokenizers library's multithreaded decode_batch. GPU path: parse_scores_from_tokens + vote_cuda.
"""
from __future__ import annotations

import random
import time

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast
from triton.testing import do_bench

from grm_engine.gpu_scoring import parse_scores_cuda, rule_reward_cuda, vote_cuda
from grm_engine.parsing import parse_scores_cpp
from grm_engine.vocab_bytes import VocabBytes, _bytes_to_unicode
from grm_engine.voting import vote

VOCAB_SIZE = 151_643
K, N_RESPONSES = 8, 2
DEVICE = "cuda"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen's vocabulary size: 256 byte tokens + random prose pieces."""
    to_char = {b: c for c, b in _bytes_to_unicode().items()}
    rng = random.Random(0)
    tokens = [to_char[b] for b in range(256)]
    for piece in ["\\boxed{", ", ", "10", " Scores:", "\n\n"]:
        tokens.append("".join(to_char[b] for b in piece.encode()))
    seen = set(tokens)
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ      .,;:'\"()-0123456789\n"
    while len(tokens) < VOCAB_SIZE:
        token = "".join(to_char[b] for b in bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 9))))
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def make_batch(tokenizer, rows: int, length: int, with_group: bool, seed: int, device="cuda"):
    """ids [rows, length] int32 on the GPU, lengths [rows]; padding past each length is EOS."""
    g = torch.Generator().manual_seed(seed)
    vocab = tokenizer.get_vocab()
    to_char = {b: c for c, b in _bytes_to_unicode().items()}

    def token_id(piece: str) -> int:
        return vocab["".join(to_char[b] for b in piece.encode())]

    ids = torch.randint(300, VOCAB_SIZE, (rows, length), generator=g, dtype=torch.int32)
    lengths = torch.randint(800, length + 1, (rows,), generator=g, dtype=torch.int32)
    eos = vocab["<|endoftext|>"]
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = eos
    if with_group:
        boxed, comma, brace, newline = token_id("\\boxed{"), token_id(", "), token_id("}"), token_id("\n")
        digits = torch.tensor([token_id(str(d)) for d in range(1, 11)], dtype=torch.int32)
        a = digits[torch.randint(0, 10, (rows,), generator=g)]
        b = digits[torch.randint(0, 10, (rows,), generator=g)]
        group = torch.stack([torch.full_like(a, boxed), a, torch.full_like(a, comma), b, torch.full_like(a, brace),
                             torch.full_like(a, newline)], dim=1)  # [rows, 6]: \boxed{ a ,  b } \n
        start = lengths - group.shape[1]
        columns = start[:, None] + torch.arange(group.shape[1])[None, :]
        ids.scatter_(1, columns.long(), group)
    return ids.to(device), lengths.to(device)


def cpu_path(tokenizer, ids_gpu, lengths_gpu, perm, fast_decode: bool):
    """Host copy + decode + C++ parser + reference vote; returns (seconds, parsed, vote)."""
    if ids_gpu.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    ids, lengths = ids_gpu.cpu(), lengths_gpu.cpu()
    rows = [ids[i, : int(lengths[i])].tolist() for i in range(ids.shape[0])]
    if fast_decode:
        texts = tokenizer.backend_tokenizer.decode_batch(rows, skip_special_tokens=True)
    else:
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    parsed = parse_scores_cpp(texts, N_RESPONSES)
    groups = ids.shape[0] // K
    result = vote(parsed.scores.view(groups, K, N_RESPONSES), parsed.status.view(groups, K), perm=perm.cpu())
    return time.perf_counter() - start, parsed, result


def run(args) -> list[dict]:
    rows_total, length = (8192, 1024) if args.quick else (65_536, 1024)
    cpu_rows = 2048 if args.quick else 8192
    tokenizer = build_tokenizer()
    vocab = VocabBytes(tokenizer).to(DEVICE)
    bandwidth = (args.ceilings or {}).get("bandwidth")
    out = []

    ids, lengths = make_batch(tokenizer, rows_total, length, with_group=True, seed=1, device=DEVICE)
    groups = rows_total // K
    g = torch.Generator().manual_seed(2)
    perm = torch.stack([torch.randperm(N_RESPONSES, generator=g) for _ in range(groups * K)]).view(groups, K, N_RESPONSES)
    perm_gpu = perm.to(DEVICE, torch.int32)

    def parse():
        return parse_scores_cuda(ids, lengths, vocab, N_RESPONSES)

    def parse_and_vote():
        parsed = parse()
        return vote_cuda(parsed.scores.view(groups, K, N_RESPONSES), parsed.status.view(groups, K), perm=perm_gpu,
                         validate=False)

    parsed = parse()
    ms_parse = do_bench(parse, warmup=10, rep=100, return_mode="median")
    ms_vote = do_bench(lambda: vote_cuda(parsed.scores.view(groups, K, N_RESPONSES), parsed.status.view(groups, K),
                                         perm=perm_gpu, validate=False), warmup=10, rep=100, return_mode="median")
    ms_both = do_bench(parse_and_vote, warmup=10, rep=100, return_mode="median")
    gpu_vote = parse_and_vote()
    labels = torch.randint(0, N_RESPONSES, (rows_total,), device=DEVICE)
    def parse_and_reward():
        fresh = parse()
        return rule_reward_cuda(fresh.scores, fresh.status, labels, validate=False)

    ms_reward = do_bench(parse_and_reward, warmup=10, rep=100, return_mode="median")

    # CPU path on the first cpu_rows rows (whole groups), scaled to all rows; and equality there.
    scale = rows_total / cpu_rows
    seconds, cpu_parsed, cpu_vote = cpu_path(tokenizer, ids[:cpu_rows], lengths[:cpu_rows], perm[: cpu_rows // K], False)
    seconds_fast, _, _ = cpu_path(tokenizer, ids[:cpu_rows], lengths[:cpu_rows], perm[: cpu_rows // K], True)
    match = (torch.equal(parsed.status[:cpu_rows].cpu(), cpu_parsed.status)
             and torch.equal(parsed.scores[:cpu_rows].cpu().view(torch.int32), cpu_parsed.scores.view(torch.int32))
             and torch.equal(gpu_vote.totals[: cpu_rows // K].cpu().view(torch.int32), cpu_vote.totals.view(torch.int32))
             and torch.equal(gpu_vote.best[: cpu_rows // K].cpu(), cpu_vote.best))
    ref_ms, peer_ms = seconds * scale * 1e3, seconds_fast * scale * 1e3
    shape = f"{rows_total}x{length} int32, k={K}, n={N_RESPONSES}"
    out.append({"section": "parse", "case": f"parse {shape}", "ours_ms": ms_parse})
    out.append({"section": "parse", "case": f"vote {groups} groups (+perm)", "ours_ms": ms_vote})
    out.append({"section": "parse", "case": f"parse+rule_reward {rows_total} rows (GRPO reward)", "ours_ms": ms_reward})
    out.append({"section": "parse", "case": f"parse+vote {shape}", "ours_ms": ms_both, "ref_ms": ref_ms,
                "peer_ms": peer_ms, "x_vs_cpu": ref_ms / ms_both, "x_vs_peer": peer_ms / ms_both,
                "cpu_rows_timed": cpu_rows, "matches_cpu": match, "target_ms": 1.0})

    # Worst case: no group anywhere, every id of every row is read once.
    ids_none, lengths_none = make_batch(tokenizer, rows_total, length, with_group=False, seed=3, device=DEVICE)
    lengths_none.fill_(length)
    ms_scan = do_bench(lambda: parse_scores_cuda(ids_none, lengths_none, vocab, N_RESPONSES), warmup=10, rep=100,
                       return_mode="median")
    row = {"section": "parse", "case": f"parse, no group (full scan) {rows_total}x{length}", "ours_ms": ms_scan}
    if bandwidth:
        row["floor_ms"] = ids_none.numel() * ids_none.element_size() / bandwidth * 1e3
        row["pct_floor"] = 100 * row["floor_ms"] / ms_scan
    out.append(row)
    return out
