"""Where GRM.score spends its time at the benchmark shape (bench/gpu_score.py's model, data and tokenizer).

    python bench/profile_score.py [--examples 512] [--k 8] [--max-num-seqs 512,2048] [--batched-tokens 8192]

Per setting: wall time split into building the requests (prompts, tokenization), decoder prefill steps, decoder
decode steps, and what follows generate (parsing, voting, records), with step counts and the decode batch size;
then a cProfile of one run (top functions by own time) and a torch.profiler table of a few prefill steps, under $OUT.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_score  # noqa: E402


def timed_methods(grm, seconds: dict):
    """Wrap GRM._requests / GRM._generate so their wall time adds up in `seconds`."""
    for name in ("_requests", "_generate"):
        inner = getattr(grm, name)

        def wrapper(*args, _inner=inner, _name=name, **kwargs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - t0
        setattr(grm, name, wrapper)


def one_run(model, tokenizer, examples, k, max_num_seqs, batched_tokens, profile_path=None) -> dict:
    from grm_engine.decode import Decoder
    from grm_engine.grm import GRM

    t0 = time.perf_counter()
    decoder = Decoder.from_pretrained(model, tokenizer=tokenizer, kv_cache_memory_fraction=0.85,
                                      max_num_seqs=max_num_seqs, max_num_batched_tokens=batched_tokens)
    build_s = time.perf_counter() - t0
    grm = GRM(decoder, tokenizer)
    t0 = time.perf_counter()
    grm.score(gpu_score.synthetic_examples(8, seed=99), k=k, max_tokens=4, ignore_eos=True, seed=1)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    seconds: dict = {}
    timed_methods(grm, seconds)
    profiler = cProfile.Profile() if profile_path else None
    torch.cuda.synchronize()
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    result = grm.score(examples, k=k, temperature=0.5, max_tokens=gpu_score.NEW_TOKENS, ignore_eos=True, seed=0)
    torch.cuda.synchronize()
    if profiler:
        profiler.disable()
    total = time.perf_counter() - start
    stats = decoder.stats
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        with open(profile_path, "w") as f:
            f.write(text.getvalue())
    row = {
        "examples": len(examples), "k": k, "max_num_seqs": max_num_seqs, "batched_tokens": batched_tokens,
        "cprofile": bool(profiler), "total_s": round(total, 3), "critiques/s": round(len(examples) * k / total, 1),
        "requests_s": round(seconds.get("_requests", 0), 3), "generate_s": round(seconds.get("_generate", 0), 3),
        "after_generate_s": round(total - seconds.get("_requests", 0) - seconds.get("_generate", 0), 3),
        "prefill_s": round(stats.prefill_seconds, 3), "decode_s": round(stats.decode_seconds, 3),
        "prefill_steps": stats.prefill_steps, "decode_steps": stats.decode_steps,
        "mean_decode_batch": round(stats.generated_tokens / max(stats.decode_steps, 1), 1),
        "prefill_tokens": stats.prefill_tokens, "prefix_hit_tokens": stats.prefix_cache_hit_tokens,
        "preemptions": stats.preemptions, "pool_blocks": decoder.block_manager.num_blocks,
        "peak_blocks": stats.peak_blocks_in_use, "decoder_build_s": round(build_s, 2), "warm_s": round(warm_s, 2),
        "graphs": stats.extra.get("cuda_graphs"), "graph_capture_s": stats.extra.get("graph_capture_s"),
    }
    del decoder, grm, result
    gc.collect()  # the decoder's KV pool must be gone before the next one sizes its own from free memory
    torch.cuda.empty_cache()
    return row


def profile_prefill(model, tokenizer, path: str) -> None:
    """torch.profiler over a score call with 2 new tokens: almost all of it is prefill."""
    from torch.profiler import ProfilerActivity, profile

    from grm_engine.decode import Decoder
    from grm_engine.grm import GRM

    decoder = Decoder.from_pretrained(model, tokenizer=tokenizer, kv_cache_memory_fraction=0.5, max_num_seqs=512)
    grm = GRM(decoder, tokenizer)
    examples = gpu_score.synthetic_examples(24, seed=5)
    grm.score(examples[:8], k=8, max_tokens=2, ignore_eos=True, seed=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        grm.score(examples[8:], k=8, max_tokens=2, ignore_eos=True, seed=1)
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
        f.write("\n\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    del decoder, grm
    torch.cuda.empty_cache()


def profile_decode(model, tokenizer, path: str, examples: int = 64, k: int = 8, new_tokens: int = 66) -> dict:
    """A decode step at the benchmark's batch (examples x k sequences): GPU time per step (torch.profiler,
    a 2-token run subtracted from a new_tokens run) against wall time per step, and the time the host spends
    waiting for step tokens (PendingStep.wait): near zero means the host is the bottleneck."""
    from torch.profiler import ProfilerActivity, profile

    from grm_engine.decode import Decoder, step_state
    from grm_engine.grm import GRM

    decoder = Decoder.from_pretrained(model, tokenizer=tokenizer, kv_cache_memory_fraction=0.5, max_num_seqs=examples * k)
    grm = GRM(decoder, tokenizer)
    data = gpu_score.synthetic_examples(3 * examples, seed=7)
    grm.score(data[:8], k=k, max_tokens=4, ignore_eos=True, seed=1)
    waited = [0.0]
    inner = step_state.PendingStep.wait

    def timed_wait(self):
        t0 = time.perf_counter()
        try:
            return inner(self)
        finally:
            waited[0] += time.perf_counter() - t0
    step_state.PendingStep.wait = timed_wait
    totals, walls, tables = [], [], []
    try:
        for tokens, chunk in ((2, data[examples:2 * examples]), (new_tokens, data[2 * examples:])):
            torch.cuda.synchronize()
            waited[0] = 0.0
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                grm.score(chunk, k=k, max_tokens=tokens, ignore_eos=True, seed=1)
                torch.cuda.synchronize()
            events = prof.key_averages()
            totals.append(sum(e.self_device_time_total for e in events) / 1e3)  # ms
            walls.append((decoder.stats.decode_seconds, decoder.stats.decode_steps, waited[0]))
            tables.append(events.table(sort_by="self_cuda_time_total", row_limit=30))
    finally:
        step_state.PendingStep.wait = inner
    steps = walls[1][1] - walls[0][1]
    row = {"decode_batch": examples * k, "decode_steps": steps,
           "gpu_ms_per_step": round((totals[1] - totals[0]) / steps, 3),
           "wall_ms_per_step": round(1e3 * (walls[1][0] - walls[0][0]) / steps, 3),
           "host_wait_ms_per_step": round(1e3 * walls[1][2] / max(walls[1][1], 1), 3)}
    with open(path, "w") as f:
        f.write(json.dumps(row) + "\n\n" + tables[1])
    del decoder, grm
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=gpu_score.NUM_EXAMPLES)
    parser.add_argument("--k", type=int, default=gpu_score.K)
    parser.add_argument("--max-num-seqs", default="512")
    parser.add_argument("--batched-tokens", default="8192")
    parser.add_argument("--cprofile", action="store_true", help="also one cProfile'd run at the first setting")
    parser.add_argument("--prefill-profile", action="store_true")
    parser.add_argument("--decode-profile", default="", help="decode batches to profile, e.g. 64x8,256x8")
    args = parser.parse_args()
    out = os.environ.get("OUT", ".")
    model = gpu_score.build_model(gpu_score.SHAPE)
    tokenizer = gpu_score.word_tokenizer(gpu_score.SHAPE["vocab_size"])
    examples = gpu_score.synthetic_examples(args.examples)
    rows = []
    for seqs in [int(s) for s in args.max_num_seqs.split(",")]:
        for tokens in [int(t) for t in args.batched_tokens.split(",")]:
            rows.append(one_run(model, tokenizer, examples, args.k, seqs, tokens))
            print(json.dumps(rows[-1]), flush=True)
    if args.cprofile:
        seqs, tokens = int(args.max_num_seqs.split(",")[0]), int(args.batched_tokens.split(",")[0])
        rows.append(one_run(model, tokenizer, examples[:128], args.k, seqs, tokens,
                            profile_path=os.path.join(out, "score_cprofile.txt")))
        print(json.dumps(rows[-1]), flush=True)
    for shape in [s for s in args.decode_profile.split(",") if s]:
        num, k = (int(x) for x in shape.split("x"))
        rows.append(profile_decode(model, tokenizer, os.path.join(out, f"score_decode_profile_{shape}.txt"), num, k))
        print(json.dumps(rows[-1]), flush=True)
    if args.prefill_profile:
        profile_prefill(model, tokenizer, os.path.join(out, "score_prefill_profile.txt"))
    with open(os.path.join(out, "profile_score.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
