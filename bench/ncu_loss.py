r"""Launch our GRPO loss kernels and Liger's forward and backward kernels once each on the benchmark shape, for
Nsight Compute to compare (DRAM bytes, achieved bandwidth, occupancy, stall reasons). Liger comes from the carried
wheel: install it into /tmp/site (bench/gpu_run.sh does this too) and put /tmp/site on PYTHONPATH in the SAME shell
command as ncu, or the Liger half is skipped ("liger not importable"):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/liger_kernel-*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH && ncu --clock-control none \
        --kernel-name regex:"_check_sequences_kernel|_grpo_rows_kernel|_grad_rows_kernel|_scale_rows_kernel|_grpo_loss_bwd_kernel|_grpo_loss_fwd_kernel" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        python bench/ncu_loss.py
"""
import torch

import grm_engine

BATCH, LENGTH, VOCAB = 16, 1024, 152064


def main():
    torch.manual_seed(0)
    buffer = (torch.randn(BATCH, LENGTH + 1, VOCAB, device="cuda") * 2).bfloat16().requires_grad_()
    view = buffer[:, :-1]
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), device="cuda")
    mask = torch.ones(BATCH, LENGTH, device="cuda")
    logp = -torch.rand(BATCH, LENGTH, device="cuda") * 12
    old, ref = logp + 0.1 * torch.randn_like(logp), logp + 0.1 * torch.randn_like(logp)
    advantages = torch.randn(BATCH, device="cuda")
    loss, _ = grm_engine.grpo_loss(view, ids, mask, advantages=advantages, old_logp=old, ref_logp=ref, beta=0.08)
    torch.autograd.grad(loss, view)
    torch.cuda.synchronize()
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as exc:
        print(f"liger not importable (is /tmp/site on PYTHONPATH in this shell?): {exc}")
        return
    loss, _ = triton_grpo_loss(buffer, old, ref, ids, advantages, mask, temperature=1.0, beta=0.08, eps_low=0.2,
                               eps_high=0.2, inplace=True, loss_type="grpo", reduce=True)
    torch.autograd.grad(loss, buffer)
    torch.cuda.synchronize()
    print("launched ours and Liger's kernels once each")


if __name__ == "__main__":
    main()
