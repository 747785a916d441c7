"""Host cost of one grpo_loss call + backward (issue 13, item 5): what the host does before, between and after the
Triton launches, op by op. On an idle GPU every microsecond before the loss kernel's launch is GPU idle time.

    python bench/loss_host.py                          # CPU: the Triton launches are replaced by no-ops (counted)
    python bench/loss_host.py --device cuda            # GPU: real launches; + synchronized call vs Liger, idle gaps
    python bench/loss_host.py --device cuda --padding 0,0.5 --calls 200

Per phase (call start -> each Triton launch -> end of forward -> end of backward): median host microseconds, torch
ops dispatched (TorchDispatchMode, a separate counting pass) and the Triton launches' own host time. On CPU, no
kernel runs (the launch hook below records and returns, so outputs are garbage) and the small torch ops run for
real, so phase times are host work plus tiny CPU compute; the "triton binder" column estimates what JITFunction.run
spends binding and specializing the same arguments for an sm_90 target (Triton's own code, run here without a GPU).
On CUDA: synchronized before and after each call; "host before first kernel" is the call start to the first
Triton launch's return; plus the synchronized single-call time of ours and Liger's in the same process and a
torch.profiler summary of the GPU's idle gaps (bench/gpu_loss.py's summarize_trace).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
LOSS_KERNEL = "_grpo_rows_kernel"  # the big kernel: every microsecond of host work before it is GPU idle time
sys.path.insert(0, HERE)


def loss_kernels(modules=None):
    """{name: kernel object} of every Triton kernel in `modules` (default: the ones grpo_loss launches)."""
    from triton.runtime.jit import KernelInterface

    if modules is None:  # those that exist (the harness also measures older commits)
        modules = []
        for name in ("grpo_loss", "grpo_grad", "token_id_check"):
            try:
                modules.append(importlib.import_module(f"grm_engine.kernels.{name}"))
            except ImportError:
                pass
    found = {}
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, KernelInterface) and hasattr(value, "run"):
                found[name] = value
    return found


@contextlib.contextmanager
def launch_hook(events: list, launch: bool, modules=None):
    """Test-only: every launch of a kernel in `modules` (default: grpo_loss's) appends (name, t_enter, t_exit,
    args, kwargs) to events; with launch=False the kernel does not run (CPU timing of the host path alone)."""
    kernels = loss_kernels(modules)
    for name, kernel in kernels.items():
        inner = kernel.run

        def run(*args, _name=name, _inner=inner, grid, warmup, **kwargs):
            enter = time.perf_counter()
            result = _inner(*args, grid=grid, warmup=warmup, **kwargs) if launch else None
            events.append((_name, enter, time.perf_counter(), args, kwargs))
            return result

        kernel.run = run  # an instance attribute: KernelInterface.__getitem__ calls self.run
    try:
        yield
    finally:
        for kernel in kernels.values():
            del kernel.run


class OpCounter(TorchDispatchMode):
    """(time, aten op name) of every op dispatched below autograd."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((time.perf_counter(), str(func.overloadpacket.__name__)))
        return func(*args, **(kwargs or {}))


def make_inputs(batch, length, vocab, padding, device, dtype):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    buffer = (torch.randn(batch, length + 1, vocab, device=device, dtype=dtype) * 2).requires_grad_()  # [B, T+1, V]
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    keep = ((torch.arange(batch) + 0.5) / batch * 2 * (1 - padding) * length).long().clamp(1, length)
    mask = (torch.arange(length)[None, :] < keep[:, None]).float() if padding else torch.ones(batch, length)
    logp = -torch.rand(batch, length, generator=gen) * 12
    old = logp + torch.randn(batch, length, generator=gen) * 0.1
    ref = logp + torch.randn(batch, length, generator=gen) * 0.1
    advantages = torch.randn(batch, generator=gen)
    return buffer, ids, *(t.to(device) for t in (mask, old, ref, advantages))


def make_call(buffer, ids, mask, old, ref, advantages, marks=None):
    """One forward + backward through torch.autograd.grad, as a training step calls it; marks gets the time
    the forward returned."""
    import grm_engine

    view = buffer[:, :-1]  # logits[:, t] predicts token t: a strided view, as a model's output is sliced

    def call():
        loss, _ = grm_engine.grpo_loss(view, ids, mask, advantages=advantages, old_logp=old, ref_logp=ref, beta=0.08)
        if marks is not None:
            marks.append(time.perf_counter())
        return torch.autograd.grad(loss, view)

    return call


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def phase_bounds(start, launches, forward_end, end):
    """[(label, t0, t1)]: call start -> each launch's entry; a launch's own time; ... -> forward end -> end."""
    bounds, cursor, label = [], start, "call start"
    for name, enter, leave, *_ in launches:
        if cursor < forward_end <= enter:
            bounds.append((f"{label} -> forward returns", cursor, forward_end))
            cursor, label = forward_end, "forward returns"
        bounds.append((f"{label} -> {name} launch", cursor, enter))
        bounds.append((f"  {name} (Triton launch)", enter, leave))
        cursor, label = leave, name
    if cursor < forward_end:
        bounds.append((f"{label} -> forward returns", cursor, forward_end))
        cursor, label = forward_end, "forward returns"
    bounds.append((f"{label} -> backward returns (+ GPU done)", cursor, end))
    return bounds


def time_phases(call, device, calls, launch):
    """{phase: (median, min) microseconds} over `calls` synchronized calls, and the same for the whole call and
    for the host time to the first launch (min: the cost without interference from other processes)."""
    per_phase, totals, first_launch, loss_launch = {}, [], [], []
    for _ in range(calls):
        events = []
        call.marks.clear()
        sync(device)
        with launch_hook(events, launch):
            start = time.perf_counter()
            call()
            sync(device)
            end = time.perf_counter()
        bounds = phase_bounds(start, events, call.marks[0], end)
        for label, t0, t1 in bounds:
            per_phase.setdefault(label, []).append((t1 - t0) * 1e6)
        totals.append((end - start) * 1e6)
        first_launch.append((events[0][2] - start) * 1e6 if events else float("nan"))
        loss_launch.append(next(((leave - start) * 1e6 for name, _, leave, *_ in events if name == LOSS_KERNEL),
                                float("nan")))

    def both(values):
        return statistics.median(values), min(values)

    return ({label: both(values) for label, values in per_phase.items()}, both(totals), both(first_launch),
            both(loss_launch))


def first_launch_us(fn, calls=50, modules=None):
    """Median host microseconds from the start of a synchronized call of fn to the return of its first Triton
    launch (a kernel of `modules`): the time an idle GPU waits for the host before the first kernel."""
    times = []
    fn()
    for _ in range(calls):
        events = []
        torch.cuda.synchronize()
        with launch_hook(events, launch=True, modules=modules):
            start = time.perf_counter()
            fn()
        times.append((events[0][2] - start) * 1e6 if events else float("nan"))
    return statistics.median(times)


def count_ops(call, device):
    """One call under the op counter with no-op or real launches -> (phase bounds, ops, launches)."""
    events = []
    counter = OpCounter()
    sync(device)
    with launch_hook(events, launch=device == "cuda"):
        start = time.perf_counter()
        with counter:
            call()
        sync(device)
        end = time.perf_counter()
    return phase_bounds(start, events, call.marks[-1], end), counter.ops, events


def binder_estimate(events, repeats=200):
    """{kernel: microseconds} that Triton's JITFunction.run spends binding + specializing these arguments and
    building its cache key, for an sm_90 target (Triton's own binder, run on this CPU; no GPU needed)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature
    except Exception as exc:  # another Triton version: the estimate is optional
        return {"error": f"{type(exc).__name__}: {exc}"}
    backend = make_backend(GPUTarget("cuda", 90, 32))
    kernels = loss_kernels()
    result = {}
    for name, _, _, args, kwargs in events:
        jit = JITFunction(kernels[name].fn)
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        options = dict(kwargs, debug=False)
        cache = {}
        binder(*args, **options)  # warm-up (first call pays one-time costs)
        best = float("inf")
        for _ in range(5):  # the best of 5 rounds: this machine may be shared
            start = time.perf_counter()
            for _ in range(repeats):
                _, specialization, opts = binder(*args, **options)
                compute_cache_key(cache, specialization, opts)
            best = min(best, (time.perf_counter() - start) / repeats * 1e6)
        result[name] = result.get(name, 0.0) + best
    return result


def print_phases(title, phases, ops_by_phase, launches_by_phase, total, first, loss, binder=None):
    print(f"\n{title}")
    print(f"{'phase':56s} {'median us':>9s} {'min us':>7s} {'torch ops':>9s}  ops")
    for label, (median, least) in phases.items():
        ops = ops_by_phase.get(label, Counter())
        listed = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in ops.most_common(8))
        more = "" if len(ops) <= 8 else f", +{len(ops) - 8} more kinds"
        print(f"{label:56s} {median:9.1f} {least:7.1f} {sum(ops.values()):9d}  {listed}{more}")
    launches = sum(launches_by_phase.values())
    print(f"{'total (synchronized call)':56s} {total[0]:9.1f} {total[1]:7.1f} "
          f"{sum(sum(c.values()) for c in ops_by_phase.values()):9d}  {launches} Triton launches")
    print(f"host time from the call's start to the return of the first Triton launch: median {first[0]:.1f} us, "
          f"min {first[1]:.1f} us; of the loss kernel's launch ({LOSS_KERNEL}): median {loss[0]:.1f} us, "
          f"min {loss[1]:.1f} us")
    if binder:
        print("Triton binder + cache key per launch (sm_90 target, this CPU), us: "
              + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in binder.items()))


def bucket_ops(bounds, ops):
    """{phase label: Counter of op names} for the op timestamps inside each phase."""
    out = {}
    for label, t0, t1 in bounds:
        out[label] = Counter(name for t, name in ops if t0 <= t < t1)
    return out


class Call:
    """call() with the forward's return time in .marks (a plain closure cannot expose it)."""

    def __init__(self, inputs):
        self.marks = []
        self._call = make_call(*inputs, marks=self.marks)

    def __call__(self):
        return self._call()


def liger_call(buffer, ids, mask, old, ref, advantages):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def call():
        loss, _ = triton_grpo_loss(buffer, old, ref, ids, advantages, mask, temperature=1.0, beta=0.08, eps_low=0.2,
                                   eps_high=0.2, inplace=True, loss_type="grpo", reduce=True)
        return torch.autograd.grad(loss, buffer)

    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=None, help="default: 152064 on cuda, 256 on cpu (no kernel "
                                                                "runs there, so V only sizes the logits)")
    parser.add_argument("--padding", default="0", help="comma-separated fractions of masked tokens")
    parser.add_argument("--calls", type=int, default=None, help="timed calls (default 200 on cuda, 100 on cpu)")
    args = parser.parse_args()
    device = args.device
    vocab = args.vocab or (152064 if device == "cuda" else 256)
    calls = args.calls or (200 if device == "cuda" else 100)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":  # the small torch ops run on this CPU: one thread, no denormal slow path in garbage outputs
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
    print(f"grpo_loss host path: B={args.batch} T={args.length} V={vocab} {dtype} on {device}, torch "
          f"{torch.__version__}, {'real launches' if device == 'cuda' else 'Triton launches replaced by no-ops'}")
    for padding in (float(p) for p in args.padding.split(",")):
        inputs = make_inputs(args.batch, args.length, vocab, padding, device, dtype)
        call = Call(inputs)
        with launch_hook([], launch=device == "cuda"):
            call()  # compile / warm up
            call()
        sync(device)
        phases, total, first, loss = time_phases(call, device, calls, launch=device == "cuda")
        bounds, ops, events = count_ops(call, device)
        # the counting pass's labels equal the timing pass's (same launch sequence)
        ops_by_phase = bucket_ops(bounds, ops)
        launches = Counter(label for label, *_ in bounds if label.endswith("(Triton launch)"))
        binder = binder_estimate(events) if device == "cpu" else None
        print_phases(f"padding {padding:.0%}: {len(events)} Triton launches, {len(ops)} torch ops per call",
                     phases, ops_by_phase, launches, total, first, loss, binder)
        if device == "cuda":
            from gpu_loss import synchronized_ms  # the bench's 'one call, synchronized' timer

            ours_ms = synchronized_ms(call, calls)
            line = (f"one call, synchronized: ours {ours_ms:.3f} ms (host before the loss kernel's launch returns: "
                    f"{first_launch_us(call, calls):.0f} us)")
            try:
                import liger_kernel.ops.grpo_loss as liger_ops

                peer = liger_call(*inputs)
                line += (f", Liger {synchronized_ms(peer, calls):.3f} ms (host before its loss kernel: "
                         f"{first_launch_us(peer, calls, modules=(liger_ops,)):.0f} us)")
            except Exception as exc:
                line += f", Liger n/a ({type(exc).__name__}: {str(exc)[:100]})"
            print(line)
            from gpu_loss import profile_calls

            summary = profile_calls(call, calls=1)
            print("profile of 1 isolated call: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                             for k, v in summary.items()))
        del inputs, call
    return 0


if __name__ == "__main__":
    if not any("cuda" in arg for arg in sys.argv[1:]):
        # the CPU run goes through the Triton path (its launches become no-ops); Triton reads this when the
        # kernels are decorated, i.e. when grm_engine.kernels is first imported (after this line)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("GRM_ENGINE_BACKEND", "triton")
    sys.exit(main())
