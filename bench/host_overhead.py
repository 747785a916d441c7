"""Host-side cost of a decode step, on CPU with a tiny random Qwen2 (no GPU needed).

On the GPU a decode step of a small model is mostly host time (Python scheduling, building the step's
tensors, launching ops, syncs). Here the model is so small (hidden 64, 2 layers) that its forward is
mostly per-op dispatch too, so ms per decode step ~ host work. The step is split into: scheduling and
bookkeeping (Python), prepare (step tensors), forward (model ops + logits), sample (sampler incl. noise).

    python bench/host_overhead.py            # vocab 4096 and 32768, 32 and 256 sequences
    python bench/host_overhead.py --profile  # plus the top functions of cProfile by cumulative time
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch


def tiny_qwen2(vocab_size: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
                            tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


class PhaseTimer:
    """Wraps a bound method so that its wall time adds up under `name`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.patched: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, name: str) -> None:
        if not hasattr(owner, attr):
            return  # an older decoder without this phase
        inner = getattr(owner, attr)
        self.patched.append((owner, attr, owner.__dict__.get(attr)))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self.patched):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self.patched.clear()


def run_case(vocab_size: int, num_prompts: int, n: int, prompt_len: int, new_tokens: int, temperature: float,
             profile: bool, top: int) -> dict:
    from grm_engine.decode import Decoder, SamplingParams
    from grm_engine.decode import decoder as decoder_module
    from grm_engine.decode import scheduler as scheduler_module

    model = tiny_qwen2(vocab_size)
    blocks = num_prompts * n * (-(-(prompt_len + new_tokens) // 16) + 1) + 16
    dec = Decoder.from_pretrained(model, device="cpu", num_kv_blocks=blocks, block_size=16, max_num_seqs=num_prompts * n)
    prompts = [[(7 * p + 13 * i) % (vocab_size - 3) + 3 for i in range(prompt_len)] for p in range(num_prompts)]
    params = SamplingParams(n=n, temperature=temperature, max_tokens=new_tokens, ignore_eos=True, seed=1)
    dec.generate(prompts, SamplingParams(n=n, temperature=temperature, max_tokens=4, ignore_eos=True, seed=1),
                 use_tqdm=False)  # warm-up

    timer = PhaseTimer()
    timer.wrap(dec.runner, "prepare", "prepare")
    timer.wrap(dec.runner, "prepare_decode", "prepare")
    timer.wrap(getattr(decoder_module, "SamplingArrays", None), "build", "sampling_inputs")
    timer.wrap(scheduler_module.Scheduler, "schedule", "schedule")
    timer.wrap(dec.runner.model, "forward", "forward")
    timer.wrap(dec.runner.model, "compute_logits", "logits")
    timer.wrap(decoder_module, "sample", "sample")
    decode_phases: dict[str, float] = {}

    def hook(batch):  # phases of decode steps only (prefill steps are excluded)
        if not batch.is_prefill:
            for k, v in timer.seconds.items():
                decode_phases[k] = decode_phases.get(k, 0.0) + v
        timer.seconds.clear()

    dec.step_hook = hook
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    dec.generate(prompts, params, use_tqdm=False)
    if prof:
        prof.disable()
    timer.restore()
    stats = dec.stats
    steps = stats.decode_steps
    step_ms = 1e3 * stats.decode_seconds / steps
    phases_ms = {k: 1e3 * v / steps for k, v in decode_phases.items()}
    row = {"case": f"V={vocab_size} seqs={num_prompts * n} T={temperature}", "decode_steps": steps,
           "step_ms": step_ms, **{f"{k}_ms": v for k, v in sorted(phases_ms.items())}}
    row["other_ms"] = step_ms - sum(phases_ms.values())
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
        row["profile"] = out.getvalue()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--seqs", type=int, nargs="+", default=[32, 256], help="sequences (n=32 per prompt)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared 2-core box: one thread keeps the numbers steadier
    rows = []
    for vocab in args.vocab:
        for seqs in args.seqs:
            row = run_case(vocab, max(1, seqs // 32), min(32, seqs), args.prompt_len, args.new_tokens, args.temperature,
                           args.profile, args.top)
            rows.append(row)
            print(f"{row['case']:<32} step {row['step_ms']:7.2f} ms | "
                  + " ".join(f"{k[:-3]} {v:6.2f}" for k, v in row.items() if k.endswith("_ms") and k != "step_ms"), flush=True)
            if args.profile:
                print(row["profile"])
    return rows


if __name__ == "__main__":
    main()
