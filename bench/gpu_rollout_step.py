"""Where the small-batch decode step goes: the GRPO rollout shape (0.5B, 8 or 16 prompts of 512 tokens x 8
samples, 256 new tokens), the regime that limits GRPO's 1 -> 2 GPU scaling (bench/RESULTS.md, issue 14).

Prints one JSON row per batch (generate seconds, decode step ms, prefill) and, for 64 rows, a torch.profiler
table of decode steps ($OUT/rollout_profile_64.txt); then each 0.5B linear alone (F.linear, CUDA-graph replay of
50 calls, so launch cost is excluded) at M = 64 and 128 against its weight-read floor.
    python3 bench/gpu_rollout_step.py            # on the GPU machine, after bench/gpu_run.sh built the package
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_decode  # noqa: E402  (the model builder and the profiler table)

OUT = os.environ.get("OUT", ".")
SHAPE = gpu_decode.CASES[0][2]  # Qwen2.5-0.5B
LINEARS = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864),
           "lm_head": (151936, 896)}


def replay_us(call, repeat: int = 50) -> float:
    """Median us per call of `call` captured `repeat` times in one CUDA graph (5 timed replays), so launch cost is
    excluded; on the CPU (a smoke run) the wall time of one eager call."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e6
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles, sizes workspaces, sets up cuBLAS
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / repeat)
    return sorted(times)[len(times) // 2]


def linear_us(m: int, n: int, k: int, repeat: int = 50) -> float:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    return replay_us(lambda: torch.matmul(x, w.t(), out=y), repeat)


def rollout_setup(num_prompts: int, **decoder_options):
    """The 0.5B model, our Decoder on it (seats and KV pool for 128 rows of 512 + 256 tokens) and num_prompts
    seeded prompts of 512 tokens (the first 8 are the same for any count). -> (model, decoder, prompts)"""
    from grm_engine.decode import Decoder

    model = gpu_decode.build_model("qwen2", SHAPE)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, SHAPE["vocab_size"], (512,), generator=g).tolist() for _ in range(num_prompts)]
    decoder = Decoder.from_pretrained(model, max_num_seqs=128, num_kv_blocks=128 * (768 // 16 + 2), **decoder_options)
    return model, decoder, prompts


def timed_rollout(decoder, prompts) -> tuple[dict, list]:
    """A 4-token warm-up, then two generate calls of 8 samples x 256 new tokens per prompt (ignore_eos); the
    second is timed. -> (its row: rows, generate_s, decode_step_ms, decode_s, prefill_s, cuda_graphs; outputs)"""
    from grm_engine.decode import SamplingParams

    decoder.generate(prompts, SamplingParams(n=8, max_tokens=4, ignore_eos=True, seed=1), use_tqdm=False)
    for attempt in range(2):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        outputs = decoder.generate(prompts, SamplingParams(n=8, max_tokens=256, ignore_eos=True, seed=attempt),
                                   use_tqdm=False)
        end.record()
        end.synchronize()
    stats = decoder.stats
    return {"rows": len(prompts) * 8, "generate_s": start.elapsed_time(end) / 1e3,
            "decode_step_ms": 1e3 * stats.decode_seconds / max(stats.decode_steps, 1),
            "decode_s": stats.decode_seconds, "prefill_s": stats.prefill_seconds,
            "cuda_graphs": stats.extra.get("cuda_graphs")}, outputs


def main() -> None:
    from grm_engine.decode import SamplingParams

    model, decoder, prompts = rollout_setup(16)
    for count in (8, 16):
        batch = prompts[:count]
        row, _ = timed_rollout(decoder, batch)
        print(json.dumps({"section": "rollout_step", **row}), flush=True)
        if count == 8:
            params = SamplingParams(n=8, temperature=1.0, max_tokens=14, ignore_eos=True, seed=0)
            top = gpu_decode.profile_decode(decoder, batch, params, os.path.join(OUT, "rollout_profile_64.txt"))
            print(json.dumps({"section": "rollout_profile", "rows": 64, "top": top}), flush=True)
    del decoder, model
    torch.cuda.empty_cache()
    for m in (64, 128):
        for name, (n, k) in LINEARS.items():
            us = linear_us(m, n, k)
            floor_us = (n * k * 2) / 4.2e12 * 1e6
            print(json.dumps({"section": "linear", "name": name, "m": m, "n": n, "k": k, "us": round(us, 2),
                              "floor_us": round(floor_us, 2), "GB/s": round(n * k * 2 / us / 1e3)}), flush=True)


if __name__ == "__main__":
    main()
