r"""Launch the shared-prefix (cascade) decode attention once at the Qwen2.5-7B case (8 prompts x 2,048 tokens, n = 32,
private suffixes of 64-192 tokens; bench/gpu_cascade.py's batch) with the current defaults, for Nsight Compute
(occupancy, DRAM/L2 traffic, stall reasons of the prefix and the suffix kernels):

    ncu --clock-control none --kernel-name regex:"_stacked_rows_attention_kernel|_merge_slots_kernel" \
        --launch-skip 3 --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section MemoryWorkloadAnalysis python3 bench/ncu_cascade.py
"""
import sys

import torch

sys.path.insert(0, "bench")
import gpu_cascade as b  # noqa: E402

from grm_engine.kernels.cascade_attention import cascade_decode_attention, plan_cascade  # noqa: E402


def main():
    q, k_cache, v_cache, tables, lens, starts, prefix = b.build_batch(*b.CONFIG_CASE)
    plan = plan_cascade(starts, prefix, b.BLOCK_SIZE, b.NUM_HEADS, b.KV_HEADS, int(lens.max()), "cuda")
    for _ in range(2):  # the first call compiles; ncu skips its launches (--launch-skip)
        cascade_decode_attention(q, k_cache, v_cache, tables, lens, None, None, b.HEAD_DIM ** -0.5, plan=plan)
    torch.cuda.synchronize()
    print("plan: items", plan.prefix_items.shape[0], "prefix slots", plan.num_prefix_slots, "suffix splits",
          plan.num_suffix_splits)


if __name__ == "__main__":
    main()
