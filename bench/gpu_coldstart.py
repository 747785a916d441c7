"""Cold start: the first Decoder.generate of a process against later calls (issue 13, item 4).

Each case runs in a fresh Python process (nothing compiled or captured in memory), twice: with an empty Triton
cache directory (a machine's very first run) and again with the cache the first process left (every later run
of a user's command). Reported: first call, mean of the next two calls, their ratio (target <= 1.5), the CUDA
graph capture seconds and graphs captured. Random-init weights, ignore_eos, the decoder section's shapes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

CASES = {
    "qwen2.5-0.5B 1x1024 n=32 +256": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                                     num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                                     tie_word_embeddings=True), 1, 1024, 32, 256),
    "qwen2.5-7B 8x2048 n=32 +256": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                                  num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                                  tie_word_embeddings=False), 8, 2048, 32, 256),
}


def child(case: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from grm_engine.decode import Decoder, SamplingParams

    model_type, shape, num_prompts, prompt_len, n, new_tokens = CASES[case]
    config = AutoConfig.for_model(model_type, max_position_embeddings=8192, **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    t0 = time.perf_counter()
    decoder = Decoder.from_pretrained(model, kv_cache_memory_fraction=0.85, max_num_seqs=256)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    times, captures = [], []
    for call in range(3):  # new prompts each call: no prefix-cache hits make later calls cheaper
        prompts = [torch.randint(10, shape["vocab_size"], (prompt_len,), generator=g).tolist() for _ in range(num_prompts)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        decoder.generate(prompts, SamplingParams(n=n, temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=call),
                         use_tqdm=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        captures.append(decoder.stats.extra.get("graph_capture_s"))
    later = sum(times[1:]) / 2
    return {"section": "coldstart", "case": case, "first_s": times[0], "later_s": later, "ratio": times[0] / later,
            "decoder_build_s": build_s, "graph_capture_s": captures[0], "graphs": decoder.stats.extra.get("cuda_graphs"),
            "tok/s_first": num_prompts * n * new_tokens / times[0], "tok/s_later": num_prompts * n * new_tokens / later}


def run(args) -> list[dict]:
    rows = []
    cache = tempfile.mkdtemp(prefix="triton-cold-")
    for case in CASES:
        for label in ("empty Triton cache", "warm Triton cache"):
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            proc = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                rows.append({"section": "coldstart", "case": f"{case}, {label}", "error": proc.stderr[-300:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["case"] = f"{case}, {label}"
            rows.append(row)
            print(f"[coldstart] {row['case']}: first {row['first_s']:.2f} s, later {row['later_s']:.2f} s "
                  f"(x{row['ratio']:.2f}), capture {row['graph_capture_s']}", flush=True)
        cache = tempfile.mkdtemp(prefix="triton-cold-")  # the next case starts cold again
    return rows


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1])))
