"""GRPO loss on the GPU (issue 3): ours vs the PyTorch reference vs Liger-Kernel, in one run.

Cases: logits path fwd+bwd (B=16, T=1024, V=152064 bf16), the same at 50% padding, a kernel-config sweep,
forward-only token log-probs, and the fused lm_head path (16,384 tokens, H=3584) unpadded, 50% padded and at
65,536 tokens. Floors: bytes / measured copy bandwidth (logits path), FLOPs / measured bf16 matmul rate (fused).
Liger is imported lazily; a failed import or call records 'n/a' (the reason goes to the row's `note`).
"profile" rows: where the time of one call goes on the GPU (torch.profiler, CUDA activity): the GPU ops per call,
their summed time (kernel_ms), the span from the first op's start to the last one's end (ours_ms), the idle time
inside that span and every idle gap over 20 us with the GPU ops around it and the host op that launched the next.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import torch
from triton.testing import do_bench

import grm_engine
from grm_engine.kernels.grpo_loss import grpo_loss_triton
from grm_engine.loss import fused_linear_grpo_loss_reference, grpo_loss_reference, token_logprobs_reference

BETA = 0.08
DEVICE = "cuda"
LOGITS_SHAPE = {False: (16, 1024, 152064), True: (4, 512, 152064)}  # by args.quick: (B, T, V)
LINEAR_SHAPE = (3584, 152064)  # (H, V)
LINEAR_BATCHES = {False: (16, 16, 64), True: (4, 4, 16)}  # sequences of 1024 tokens: unpadded, 50% padded, large
LINEAR_LENGTH = 1024


def measure(fn, rep=200):
    """(median ms, peak GB allocated beyond what existed before the call); ('n/a', 'n/a', reason) on failure."""
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        return do_bench(fn, warmup=25, rep=rep, return_mode="median"), peak, ""
    except Exception as exc:  # OOM or a peer's API change must not end the section
        torch.cuda.empty_cache()
        return "n/a", "n/a", f"{type(exc).__name__}: {str(exc)[:120]}"


GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


HEAD_START_CYCLES = 10_000_000  # torch.cuda._sleep before back-to-back calls: ~5 ms for the host to queue ahead


def summarize_trace(events, calls=1, gap_us=20.0, max_gaps=6, skip=("spin_kernel",)):
    """Chrome-trace events of `calls` back-to-back calls -> per-call GPU op count, busy and span ms, idle gaps.
    A gap names the GPU op before it, the one after it and the innermost host op that launched the one after.
    GPU ops whose name contains one of `skip` (the head-start sleep) are left out."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
                  and not any(word in e.get("name", "") for word in skip)), key=lambda e: e["ts"])
    if not gpu:
        return {"gpu_ops": 0, "note": "no GPU activity in the trace"}
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    host_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")]

    def launched_by(op):
        launch = launches.get(op.get("args", {}).get("correlation"))
        if launch is None:
            return "?"
        around = [h for h in host_ops if h.get("tid") == launch.get("tid")
                  and h["ts"] <= launch["ts"] <= h["ts"] + h.get("dur", 0)]
        return min(around, key=lambda h: h.get("dur", 0))["name"] if around else launch["name"]

    def short(name, width=40):
        return name if len(name) <= width else name[: width - 3] + "..."

    busy_us = sum(e.get("dur", 0) for e in gpu)
    span_us = gpu[-1]["ts"] + gpu[-1].get("dur", 0) - gpu[0]["ts"]
    gaps, idle_us, covered_until = [], 0.0, gpu[0]["ts"]
    for before, after in zip(gpu, gpu[1:]):
        covered_until = max(covered_until, before["ts"] + before.get("dur", 0))
        gap = after["ts"] - covered_until
        idle_us += max(gap, 0.0)
        if gap > gap_us:
            gaps.append((gap, f"{gap:.0f}us {short(before['name'])} -> {short(after['name'])} "
                              f"(launched in {short(launched_by(after), 50)})"))
    listed = [text for _, text in sorted(gaps, reverse=True)[:max_gaps]]
    return {"gpu_ops": len(gpu) / calls, "kernel_ms": busy_us / calls / 1e3, "span_ms": span_us / calls / 1e3,
            "idle_ms": idle_us / calls / 1e3, "gaps_over_20us": len(gaps),
            "gaps": "; ".join(listed) + (f"; +{len(gaps) - max_gaps} more" if len(gaps) > max_gaps else "")}


def profile_calls(fn, calls=1):
    """Profile `calls` calls of fn (after a warm-up and a sync) -> summarize_trace(...) plus host_ms, the wall
    time of one unprofiled call including its syncs. One call starts on an idle GPU (its host time shows as
    gaps); several start behind a GPU sleep, so the host can queue ahead as in a training loop or do_bench,
    and the gaps left are those the calls' own host syncs cause."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    host_ms = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        if calls > 1:
            torch.cuda._sleep(HEAD_START_CYCLES)
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return {**summarize_trace(events, calls=calls), "host_ms": host_ms}


def profile_row(case, fn, calls=1):
    try:
        summary = profile_calls(fn, calls)
    except Exception as exc:  # a profiler problem must not end the section
        return {"section": "loss", "case": case, "ours_ms": "n/a", "note": f"{type(exc).__name__}: {str(exc)[:120]}"}
    return {"section": "loss", "case": case, "ours_ms": summary.pop("span_ms", "n/a"), **summary}


def synchronized_ms(fn, calls: int) -> float:
    """Median wall time (ms) of one call synchronized before and after, after one untimed call."""
    fn()
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def synchronized_call_ms(fn, calls=50):
    """Median wall time of one call that is synchronized before and after (host work before the first kernel
    counts, as it does for a training step that waits on the loss): the 'one call, synchronized' row."""
    try:
        return synchronized_ms(fn, calls), "", ""
    except Exception as exc:
        return "n/a", "", f"{type(exc).__name__}: {str(exc)[:120]}"


def host_before_loss_kernel(ours, peer):
    """Host microseconds from the start of a synchronized call to the return of its first Triton launch (the
    loss kernel, ours and Liger's): GPU idle time the host causes (bench/loss_host.py has the per-phase split)."""
    from loss_host import first_launch_us

    result = {}
    try:
        result["ours_host_us"] = first_launch_us(ours)
        if peer is not None:
            import liger_kernel.ops.grpo_loss as liger_ops

            result["peer_host_us"] = first_launch_us(peer, modules=(liger_ops,))
    except Exception as exc:  # a Triton or Liger internals change must not end the section
        result["host_note"] = f"{type(exc).__name__}: {str(exc)[:100]}"
    return result


def liger_logits_loss():
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as exc:
        return None, f"liger import: {type(exc).__name__}: {exc}"[:160]
    return triton_grpo_loss, ""


def padded_mask(batch, length, padding, device):
    """Sequence b keeps a prefix; lengths spread evenly so that `padding` of all tokens are masked."""
    if padding == 0:
        return torch.ones(batch, length, device=device)
    keep = ((torch.arange(batch, device=device) + 0.5) / batch * 2 * (1 - padding) * length).long().clamp(1, length)
    return (torch.arange(length, device=device)[None, :] < keep[:, None]).float()  # [B, T]


def loss_inputs(batch, length, device, padding, logp_scale=12.0):
    gen = torch.Generator(device=device).manual_seed(0)
    mask = padded_mask(batch, length, padding, device)
    logp = -torch.rand(batch, length, device=device, generator=gen) * logp_scale
    old = logp + torch.randn(batch, length, device=device, generator=gen) * 0.1
    ref = logp + torch.randn(batch, length, device=device, generator=gen) * 0.1
    advantages = torch.randn(batch, device=device, generator=gen)
    return mask, old, ref, advantages


def row(case, ours, ref, peer, floor_ms, **extra):
    result = {"section": "loss", "case": case, "ours_ms": ours[0], "ref_ms": ref[0], "peer_ms": peer[0],
              "floor_ms": floor_ms, "ours_GB": ours[1], "ref_GB": ref[1], "peer_GB": peer[1]}
    if isinstance(ours[0], float):
        result["pct_floor"] = 100 * floor_ms / ours[0]
        for name, other in (("x_vs_ref", ref), ("x_vs_peer", peer)):
            if isinstance(other[0], float):
                result[name] = other[0] / ours[0]
    notes = "; ".join(n for n in (ours[2], ref[2], peer[2]) if n)
    result.update(extra)
    if notes:
        result["note"] = notes
    return result


def logits_cases(args, bandwidth):
    batch, length, vocab = LOGITS_SHAPE[bool(args.quick)]
    device = DEVICE
    liger, liger_note = liger_logits_loss()
    rows = []
    buffer = (torch.randn(batch, length + 1, vocab, device=device) * 2).bfloat16().requires_grad_()  # [B, T+1, V]
    view = buffer[:, :-1]  # logits[:, t] predicts token t: a strided slice, no copy
    ids = torch.randint(0, vocab, (batch, length), device=device)
    element = buffer.element_size()
    for padding in (0.0, 0.5):
        mask, old, ref, advantages = loss_inputs(batch, length, device, padding)
        kwargs = dict(advantages=advantages, old_logp=old, ref_logp=ref, beta=BETA)
        valid_rows = int(mask.sum().item())
        masked_rows = batch * length - valid_rows
        # three passes (read; read + write the gradient) over unmasked rows, one write over masked rows
        floor_ms = (3 * valid_rows + masked_rows) * vocab * element / bandwidth * 1e3
        two_pass_ms = (2 * valid_rows + masked_rows) * vocab * element / bandwidth * 1e3

        def ours():
            loss, _ = grm_engine.grpo_loss(view, ids, mask, **kwargs)
            return torch.autograd.grad(loss, view)

        def reference():
            loss, _ = grpo_loss_reference(view, ids, mask, **kwargs)
            return torch.autograd.grad(loss, view)

        def peer():
            if liger is None:
                raise RuntimeError(liger_note)
            loss, _ = liger(buffer, old, ref, ids, advantages, mask, temperature=1.0, beta=BETA, eps_low=0.2,
                            eps_high=0.2, inplace=True, loss_type="grpo", reduce=True)
            return torch.autograd.grad(loss, buffer)

        name = f"logits fwd+bwd B={batch} T={length} V={vocab} bf16" + (" 50% pad" if padding else "")
        rows.append(row(name, measure(ours), measure(reference, rep=50), measure(peer), floor_ms,
                        two_pass_floor_ms=two_pass_ms))
        summary_row = len(rows) - 1
        sync_ours, sync_peer = synchronized_call_ms(ours), synchronized_call_ms(peer)
        rows.append(row("  one call, synchronized (host time counts)", sync_ours, ("", "", ""), sync_peer, floor_ms,
                        **host_before_loss_kernel(ours, peer if liger is not None else None)))
        rows.append(profile_row("  profile ours, 3 calls queued back to back (per call)", ours, calls=3))
        if padding == 0:
            rows.append(profile_row("  profile ours, 1 isolated call", ours))
            if liger is not None:
                rows.append(profile_row("  profile Liger, 3 calls queued back to back (per call)", peer, calls=3))
            unpadded_ms = rows[summary_row]["ours_ms"]
            sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 2
            for options in ({}, dict(grad_num_warps=8, grad_num_stages=2), dict(grad_block_v=2048, grad_num_warps=4,
                            grad_num_stages=3), dict(grad_block_v=8192, grad_num_warps=16), dict(num_warps=1, num_stages=4),
                            dict(block_v=4096, num_warps=4, num_stages=3), dict(fused_grad=True),
                            dict(fused_grad=True, block_v=4096, num_warps=4, num_stages=3),
                            dict(fused_grad=True, block_v=8192, num_warps=16, num_stages=2, programs=sms)):
                def config(options=options):
                    loss, _ = grpo_loss_triton(view, ids, mask, loss_type="grpo", **options, **kwargs)
                    return torch.autograd.grad(loss, view)

                label = " ".join(f"{k}={v}" for k, v in options.items()) or "default (split: loss kernel + grad kernel)"
                rows.append(row(f"  config {label}", measure(config), ("", "", ""), ("", "", ""), floor_ms))
        elif isinstance(unpadded_ms, float) and isinstance(rows[summary_row]["ours_ms"], float):
            rows[summary_row]["x_of_unpadded"] = rows[summary_row]["ours_ms"] / unpadded_ms

    # forward-only log-probs (old / ref log-probs): one pass over the logits
    mask = torch.ones(batch, length, device=device)
    contiguous = buffer.detach()

    def peer_logprobs():
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

        return fused_selective_log_softmax(contiguous, ids, 1.0, mask)

    def ours_logprobs():
        return grm_engine.token_logprobs(contiguous[:, :-1], ids, mask=mask)

    rows.append(row(f"token_logprobs B={batch} T={length} V={vocab} bf16", measure(ours_logprobs),
                    measure(lambda: token_logprobs_reference(contiguous[:, :-1], ids, mask=mask), rep=50),
                    measure(peer_logprobs), batch * length * vocab * element / bandwidth * 1e3))
    rows.append(profile_row("  profile token_logprobs, 3 calls queued back to back (per call)", ours_logprobs, calls=3))
    from grm_engine.kernels.grpo_loss import token_logprobs_triton

    for block_v, num_warps, num_stages in ((2048, 1, 4), (2048, 2, 3), (4096, 4, 3), (1024, 1, 4)):
        result = measure(lambda: token_logprobs_triton(contiguous[:, :-1], ids, mask=mask, block_v=block_v,
                                                       num_warps=num_warps, num_stages=num_stages))
        rows.append(row(f"  config block_v={block_v} warps={num_warps} stages={num_stages}", result, ("", "", ""),
                        ("", "", ""), batch * length * vocab * element / bandwidth * 1e3))
    del buffer, view, contiguous
    return rows


def fused_linear_cases(args, matmul_rate):
    hidden_size, vocab = LINEAR_SHAPE
    device = DEVICE
    rows = []
    weight = (torch.randn(vocab, hidden_size, device=device) * 0.02).bfloat16().requires_grad_()  # [V, H]
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=BETA, loss_type="grpo", use_ref_model=True, compiled=True)
        liger_note = ""
    except Exception as exc:
        liger, liger_note = None, f"liger import: {type(exc).__name__}: {exc}"[:160]
    batches = LINEAR_BATCHES[bool(args.quick)]
    cases = [(batches[0], LINEAR_LENGTH, 0.0, True), (batches[1], LINEAR_LENGTH, 0.5, True),
             (batches[2], LINEAR_LENGTH, 0.0, False)]
    unpadded_ms = None
    for batch, length, padding, with_others in cases:
        hidden = torch.randn(batch, length, hidden_size, device=device).bfloat16().requires_grad_()  # [B, T, H]
        ids = torch.randint(0, vocab, (batch, length), device=device)
        mask, old, ref, advantages = loss_inputs(batch, length, device, padding)
        kwargs = dict(advantages=advantages, old_logp=old, ref_logp=ref, beta=BETA)
        tokens = int(mask.sum().item())
        floor_ms = 3 * 2 * tokens * vocab * hidden_size / matmul_rate * 1e3

        def ours():
            loss, _ = grm_engine.fused_linear_grpo_loss(hidden, weight, ids, mask, **kwargs)
            return torch.autograd.grad(loss, (hidden, weight))

        def reference():
            loss, _ = fused_linear_grpo_loss_reference(hidden, weight, ids, mask, **kwargs)
            return torch.autograd.grad(loss, (hidden, weight))

        def peer():
            if liger is None:
                raise RuntimeError(liger_note)
            loss, _ = liger(hidden, weight, ids, mask, advantages, ref_per_token_logps=ref, old_per_token_logps=old)
            return torch.autograd.grad(loss, (hidden, weight))

        skipped = ("skipped", "", "")
        name = f"fused linear N={batch * length} H={hidden_size} V={vocab} bf16" + (" 50% pad" if padding else "")
        rows.append(row(name, measure(ours, rep=300), measure(reference, rep=300) if with_others else skipped,
                        measure(peer, rep=300) if with_others else skipped, floor_ms, tokens=tokens))
        if padding == 0 and with_others:
            unpadded_ms = rows[-1]["ours_ms"]
        elif padding and isinstance(unpadded_ms, float) and isinstance(rows[-1]["ours_ms"], float):
            rows[-1]["x_of_unpadded"] = rows[-1]["ours_ms"] / unpadded_ms
        del hidden
    return rows


def run(args) -> list[dict]:
    ceilings = getattr(args, "ceilings", None) or {}
    bandwidth = ceilings.get("bandwidth", 4.2e12)  # the DESIGN.md figures when the ceilings section did not run
    matmul_rate = ceilings.get("matmul", 760e12)
    rows = logits_cases(args, bandwidth)
    torch.cuda.empty_cache()
    if os.environ.get("GRM_BENCH_LOSS_CASES", "all") != "logits":  # logits: skip the fused lm_head cases (a quick re-run)
        rows += fused_linear_cases(args, matmul_rate)
    if not ceilings:
        for r in rows:
            r["note"] = (r.get("note", "") + " floors from DESIGN.md ceilings (run with --only ceilings,loss)").strip()
    return rows
