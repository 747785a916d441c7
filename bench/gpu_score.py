"""GRM scoring benchmark: 512 RewardBench-shaped examples x k=8 critiques of 256 tokens (ignore_eos), random-init
Qwen2.5-0.5B shape, GRM.score (one decoder run, shuffled prompt variants prefilled once, C++ parse, vote) against
the straightforward path: transformers generate per example with num_return_sequences=k + Python regex parsing.

The transformers path is TIMED ON A SUBSET (HF_EXAMPLES examples, fewer if they pass 45 s) and EXTRAPOLATED per example to the full set;
the row says so (ref_ms is the extrapolation, hf_examples_timed the subset size). No downloads: the tokenizer is a
word-level vocabulary of the model's size built here, and the texts come from a fixed synthetic generator with
RewardBench-like lengths (query 32-256 words, each response 64-512 words; about 900 prompt tokens).
"""
from __future__ import annotations

import os
import random
import re
import time

import torch

NUM_EXAMPLES, K, NEW_TOKENS, HF_EXAMPLES = 512, 8, 256, 8
SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
DEVICE = "cuda"  # a CPU smoke run sets "cpu" and a tiny SHAPE
SYNTHETIC_WORDS = 20000
_GROUP = re.compile(r"\\boxed\{([^}]*)\}")


def synthetic_examples(count: int, seed: int = 0):
    """RewardBench-shaped examples: two responses, chosen first (GRM.score shuffles)."""
    from grm_engine.data import Example

    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(f"w{rng.randrange(SYNTHETIC_WORDS)}" for _ in range(rng.randint(lo, hi)))
    return [Example(id=f"bench-{i}", query=text(32, 256), responses=[text(64, 512), text(64, 512)], best=0,
                    subset="synthetic") for i in range(count)]


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly vocab_size ids, so every sampled id decodes to a word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from grm_engine.protocol import build_prompt

    template_words = pre_tokenizers.Whitespace().pre_tokenize_str(build_prompt("q", ["a", "b"]) + " \\boxed{1, 2}")
    vocab = {"<unk>": 0, "<eos>": 1}
    for word, _ in template_words:
        vocab.setdefault(word, len(vocab))
    for i in range(SYNTHETIC_WORDS):
        vocab.setdefault(f"w{i}", len(vocab))
    assert len(vocab) <= vocab_size, f"{len(vocab)} words for a vocabulary of {vocab_size}"
    for i in range(vocab_size - len(vocab)):
        vocab[f"x{i}"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")


def build_model(shape):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", max_position_embeddings=4096, eos_token_id=1, **shape)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def transformers_path(model, tokenizer, examples, k: int, new_tokens: int, time_box_s: float = 45.0) -> dict:
    """Per example: one prompt, generate(num_return_sequences=k), decode, regex-parse. Stops after time_box_s
    (at least 2 examples) so the section stays under its time budget; the count timed is returned."""
    from grm_engine.protocol import build_prompt

    parsed = timed = 0
    _sync()
    start = time.perf_counter()
    for example in examples:
        if timed >= 2 and time.perf_counter() - start > time_box_s:
            break
        timed += 1
        ids = tokenizer(build_prompt(example.query, example.responses), return_tensors="pt")["input_ids"].to(DEVICE)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.5, top_k=0,
                             top_p=1.0, num_return_sequences=k, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0)
        for text in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True):
            groups = _GROUP.findall(text)
            parsed += bool(groups)
    _sync()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "per_example_s": seconds / timed, "examples": timed, "parsed": parsed}


CASES = [(512, 8), (128, 32)]  # (examples, k): 4,096 critiques each; k = 32 checks that the speed-up holds


def run(args) -> list[dict]:
    import gc

    from grm_engine.decode import Decoder
    from grm_engine.grm import GRM

    quick = getattr(args, "quick", False)
    model = build_model(SHAPE)
    tokenizer = word_tokenizer(SHAPE["vocab_size"])
    bandwidth = args.ceilings.get("bandwidth", 4.2e12) if hasattr(args, "ceilings") else 4.2e12
    matmul = args.ceilings.get("matmul", 7.6e14) if hasattr(args, "ceilings") else 7.6e14
    weight_bytes = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    kv_per_token = 2 * SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * (
        SHAPE["hidden_size"] // SHAPE["num_attention_heads"]) * 2  # K and V, bf16
    rows = []
    cases = [(128, K)] if quick else CASES if NUM_EXAMPLES == 512 else [(NUM_EXAMPLES, K)]
    seat_counts = [int(x) for x in os.environ.get("GRM_BENCH_SCORE_SEATS", "512").split(",")]  # decode batch sizes
    for (num_examples, k), seats in [(case, seats) for case in cases for seats in seat_counts]:
        hf_examples = 4 if quick else HF_EXAMPLES
        examples = synthetic_examples(num_examples)
        decoder = Decoder.from_pretrained(model, tokenizer=tokenizer, kv_cache_memory_fraction=0.85, max_num_seqs=seats,
                                          num_kv_blocks=None if DEVICE == "cuda" else 4096)
        grm = GRM(decoder, tokenizer)
        # compiles kernels for these shapes; other examples, so the timed run gets no prefix-cache hits from it
        grm.score(synthetic_examples(8, seed=99), k=k, max_tokens=4, ignore_eos=True, seed=1)
        _sync()
        start = time.perf_counter()
        result = grm.score(examples, k=k, temperature=0.5, max_tokens=NEW_TOKENS, ignore_eos=True, seed=0)
        _sync()
        seconds = time.perf_counter() - start
        generated = result.generated_tokens
        assert generated == num_examples * k * NEW_TOKENS, f"score: {generated} tokens generated"
        stats = decoder.stats
        del decoder, grm
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

        hf = transformers_path(model, tokenizer, examples[:hf_examples], k, NEW_TOKENS,
                               time_box_s=float(os.environ.get("GRM_BENCH_HF_BOX_S", "45")))
        hf_ms = 1e3 * hf["per_example_s"] * num_examples  # extrapolated to the whole set
        critiques = num_examples * k
        # Floor: prefill FLOPs (2 x parameters per prompt token computed) at the measured matmul rate, plus decode
        # bytes at the measured bandwidth: the weights once per step of a full batch (seats), and each prompt
        # variant's KV once per step while its samples decode (the cascade's shared read), each sample's own KV.
        params = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
        prefill_ms = 1e3 * 2 * params * stats.prefill_tokens / matmul
        steps = -(-critiques // seats) * NEW_TOKENS
        prompt_kv = stats.prefill_tokens * kv_per_token * NEW_TOKENS  # each variant's KV read at each of its steps
        own_kv = critiques * (NEW_TOKENS ** 2 / 2) * kv_per_token
        decode_ms = 1e3 * (steps * weight_bytes + prompt_kv + own_kv) / bandwidth
        floor_ms = prefill_ms + decode_ms
        rows.append({
            "section": "score", "case": f"{num_examples} ex x k={k} x {NEW_TOKENS} tok, qwen2.5-0.5B shape, {seats} seats",
            "ours_ms": 1e3 * seconds, "ref_ms": hf_ms, "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / (1e3 * seconds),
            "speedup": hf_ms / (1e3 * seconds),
            "critiques/s": critiques / seconds, "tok/s": generated / seconds,
            "prefill_s": stats.prefill_seconds, "decode_s": stats.decode_seconds,
            "decode_steps": stats.decode_steps, "floor_prefill_ms": prefill_ms, "floor_decode_ms": decode_ms,
            "hf_critiques/s": critiques / (hf_ms / 1e3), "hf_tok/s": critiques * NEW_TOKENS / (hf_ms / 1e3),
            "hf_examples_timed": hf["examples"], "hf_timed_s": hf["seconds"], "ref": "transformers generate, extrapolated",
            "prompt_tokens": result.prompt_tokens, "prefill_tokens": stats.prefill_tokens,
            "prefix_hit_tokens": stats.prefix_cache_hit_tokens, "preemptions": stats.preemptions,
            "parse_failures": sum(result.parse_failures.values()),
        })
        print(f"[score] {rows[-1]['case']}: {rows[-1]['critiques/s']:.1f} critiques/s "
              f"(prefill {stats.prefill_seconds:.2f} s, decode {stats.decode_seconds:.2f} s)", flush=True)
    return rows


if __name__ == "__main__":  # CPU smoke run with a tiny shape: python bench/gpu_score.py
    import argparse

    DEVICE = "cpu"
    SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=SYNTHETIC_WORDS + 200, tie_word_embeddings=True)
    NUM_EXAMPLES, K, NEW_TOKENS, HF_EXAMPLES = 6, 4, 8, 2
    print(run(argparse.Namespace(quick=False, ceilings={})))
