"""bench/gpu_loss.py's trace summary (the "profile" rows) on a hand-built Chrome trace: GPU busy time, span,
idle gaps with the ops around them and the host op that launched the next one; the head-start sleep left out."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from gpu_loss import summarize_trace  # noqa: E402


def op(cat, name, ts, dur, correlation=None, tid=None):
    event = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
    if correlation is not None:
        event["args"] = {"correlation": correlation}
    if tid is not None:
        event["tid"] = tid
    return event


TRACE = [
    op("kernel", "at::cuda::(anonymous namespace)::spin_kernel(long)", 0, 5000, correlation=9),
    op("cpu_op", "_GRPOLossFunction", 100, 300, tid=1),
    op("cpu_op", "aten::sum", 150, 20, tid=1),  # innermost op around launch 3
    op("cuda_driver", "cuLaunchKernelEx", 120, 5, correlation=1, tid=1),
    op("cuda_runtime", "cudaLaunchKernel", 160, 5, correlation=3, tid=1),
    op("cuda_runtime", "cudaMemsetAsync", 90, 2, correlation=4, tid=1),  # no host op around it
    op("gpu_memset", "Memset (Device)", 5000, 2, correlation=4),
    op("kernel", "_grpo_rows_kernel", 5010, 1000, correlation=1),
    op("kernel", "reduce_kernel", 6100, 10, correlation=3),  # 90 us after the loss kernel
    op("kernel", "_grad_rows_kernel", 6115, 2000, correlation=5),  # 5 us gap: counted as idle, not listed
]


def test_summary_counts_busy_span_and_gaps():
    summary = summarize_trace(TRACE)
    assert summary["gpu_ops"] == 4
    assert summary["kernel_ms"] == pytest.approx((2 + 1000 + 10 + 2000) / 1e3)
    assert summary["span_ms"] == pytest.approx((6115 + 2000 - 5000) / 1e3)
    assert summary["idle_ms"] == pytest.approx((8 + 90 + 5) / 1e3)
    assert summary["gaps_over_20us"] == 1
    assert summary["gaps"] == "90us _grpo_rows_kernel -> reduce_kernel (launched in aten::sum)"


def test_summary_per_call_and_empty_trace():
    assert summarize_trace(TRACE, calls=2)["span_ms"] == pytest.approx(summarize_trace(TRACE)["span_ms"] / 2)
    assert summarize_trace(TRACE, gap_us=1)["gaps"].startswith("90us")
    assert summarize_trace(TRACE, gap_us=1)["gaps_over_20us"] == 3
    assert summarize_trace([op("cpu_op", "aten::sum", 0, 5, tid=1)])["gpu_ops"] == 0


def test_loss_kernel_is_the_first_launch_with_one_op_before_it(monkeypatch):
    """bench/loss_host.py's op and launch record of one grpo_loss call + backward (launches as no-ops): with a
    gradient, the loss kernel is the first launch and only its output allocation precedes it (no other torch op
    stands between the call and the big kernel); the check, gradient and rescale kernels follow, in that order."""
    import torch

    from loss_host import Call, count_ops, make_inputs

    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")
    for padding in (0.0, 0.5):
        call = Call(make_inputs(4, 8, 16, padding, "cpu", torch.float32))
        _, ops, launches = count_ops(call, "cpu")
        assert [name for name, *_ in launches] == ["_grpo_rows_kernel", "_check_sequences_kernel",
                                                   "_grad_rows_kernel", "_scale_rows_kernel"]
        first_launch = launches[0][1]
        assert [name for t, name in ops if t < first_launch] == ["empty"]
