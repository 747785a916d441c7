"""GPU section `sampler`: the decoder's sampling step on [B, V] fp32 logits (temperature 1, no filter).

Rows: noise alone (ours = Triton kernel, ref = int64 torch reference, peer = int32 torch ops) and the
whole sample() (ours with the kernel, ref with the reference noise). floor = bytes that must move /
measured bandwidth: noise writes B*V*4; sample reads logits, writes+reads u, reads it in argmax (~5 passes).
    python bench/gpu.py --only sampler     (python bench/gpu_sampler.py runs it alone)
"""
from __future__ import annotations

import os
import types


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def run(args) -> list[dict]:
    import torch

    from grm_engine.decode.sampler import row_keys, sample, to_int32_bits, uniform_noise, uniform_noise_reference

    bandwidth = getattr(args, "ceilings", {}).get("bandwidth") or 4.0e12
    shapes = [(32, 151936), (256, 152064)] if not getattr(args, "quick", False) else [(32, 32768)]
    rows = []
    for batch, vocab in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        logits = torch.randn(batch, vocab, device="cuda", generator=g)
        keys = torch.stack([torch.full((batch,), 7), torch.zeros(batch, dtype=torch.long), torch.arange(batch),
                            torch.full((batch,), 1000)], 1).cuda()
        row_hash = to_int32_bits(row_keys(keys))
        ones, zeros = torch.ones(batch, device="cuda"), torch.zeros(batch, dtype=torch.long, device="cuda")
        assert torch.equal(uniform_noise(row_hash, vocab), uniform_noise_reference(keys, vocab))

        def torch_int32():
            os.environ["GRM_ENGINE_BACKEND"] = "reference"
            try:
                return uniform_noise(row_hash, vocab)
            finally:
                del os.environ["GRM_ENGINE_BACKEND"]

        nbytes = batch * vocab * 4
        ours, ref, peer = _bench(lambda: uniform_noise(row_hash, vocab)), _bench(lambda: uniform_noise_reference(keys, vocab)), _bench(torch_int32)
        floor = 1e3 * nbytes / bandwidth
        rows.append({"section": "sampler", "case": f"noise u {batch}x{vocab}", "ours_ms": ours, "ref_ms": ref, "peer_ms": peer,
                     "floor_ms": floor, "pct_floor": 100 * floor / ours})
        kw = dict(all_greedy=False, any_filter=False, any_greedy=False)
        ours = _bench(lambda: sample(logits, ones, zeros, ones, row_hash, **kw))
        ref = _bench(lambda: sample(logits, ones, zeros, ones, keys, noise=uniform_noise_reference, **kw))
        floor = 1e3 * 5 * nbytes / bandwidth
        rows.append({"section": "sampler", "case": f"sample() T=1 {batch}x{vocab}", "ours_ms": ours, "ref_ms": ref,
                     "floor_ms": floor, "pct_floor": 100 * floor / ours})
    return rows


if __name__ == "__main__":
    for r in run(types.SimpleNamespace(quick=False, ceilings={})):
        print(r)
