"""The loss kernels compile for sm_90 (the H200) on a machine without a GPU: Triton's interpreter, which runs the
CPU lane, accepts code the compiler rejects (a global that is not constexpr, say), and a failed compile would
otherwise surface only on the lent GPU machine. Frontend, PTX and ptxas run here (in a subprocess without
TRITON_INTERPRET); nothing is launched."""
import pytest

from triton_compile import compile_sm90, run_compile_script

pytest.importorskip("triton")

from grm_engine.kernels import grpo_grad, token_id_check  # noqa: E402
from grm_engine.kernels import grpo_loss as kernels  # noqa: E402

FLOAT_ARGS = {"weight_factor", "scale2", "inv_temp", "beta", "eps_low", "eps_high", "reward_eps", "log_ratio_max"}
INT32_ARGS = {"T", "V", "num_rows"}
POINTERS = {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "ids_ptr": "*i64", "mask_ptr": "*fp32", "count_ptr": "*i32",
            "ints_ptr": "*i32", "flag_ptr": "*i32", "scale_ptr": "*fp32"}


def signature(fn, constexprs, pointers):
    """Argument types as the launcher would see them: bf16 logits, int64 ids, fp32 everything else."""
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in pointers:
            types[name] = pointers[name]
        elif name.endswith("_ptr") or name.endswith("_out"):
            types[name] = "*fp32"
        else:
            types[name] = "fp32" if name in FLOAT_ARGS else "i32" if name in INT32_ARGS else "i64"
    return types


ROW_BASE = dict(STRIDE_LV=1, STRIDE_GV=1, GROUP_SIZE=4, GROUP_BLOCK=4, BLOCK_V=2048)
ROW_FLAGS = ("HAS_MASK", "HAS_COUNT", "HAS_REWARDS", "HAS_OLD", "HAS_REF", "COMPUTE_LOSS", "WRITE_GRAD",
             "COMPUTE_ENTROPY", "WEIGHT_LATER", "PERSISTENT")


def row_kernel(*enabled):
    """_grpo_rows_kernel's constexprs with the named flags on and the others off."""
    return {**ROW_BASE, **{flag: flag in enabled for flag in ROW_FLAGS}}


CASES = [
    ("_check_sequences_kernel", dict(NONFINITE=2, HAS_MASK=True, HAS_OLD=True, HAS_REF=True, HAS_ADV=True,
                                     HAS_REWARDS=False, BLOCK_T=1024), {"mask_ptr": "*i1"}, 4, 3),
    ("_check_sequences_kernel", dict(NONFINITE=2, HAS_MASK=False, HAS_OLD=False, HAS_REF=False, HAS_ADV=False,
                                     HAS_REWARDS=True, BLOCK_T=256), {}, 4, 3),
    ("_grpo_rows_kernel", row_kernel("HAS_MASK", "HAS_COUNT", "HAS_OLD", "HAS_REF", "COMPUTE_LOSS"), {}, 2, 3),
    ("_grpo_rows_kernel", row_kernel("HAS_MASK", "HAS_OLD", "HAS_REF", "COMPUTE_LOSS", "WEIGHT_LATER"), {}, 2, 3),
    ("_grpo_rows_kernel", row_kernel(*(f for f in ROW_FLAGS if f not in ("HAS_OLD", "WEIGHT_LATER"))), {}, 8, 2),
    ("_grpo_rows_kernel", row_kernel("COMPUTE_ENTROPY"), {}, 2, 3),  # token_logprobs
    ("_grad_rows_kernel", dict(STRIDE_LV=1, STRIDE_GV=1, V=152064, WEIGHT_LATER=False, HAS_COUNT=False,
                               BLOCK_V=8192), {}, 16, 1),
    ("_grad_rows_kernel", dict(STRIDE_LV=1, STRIDE_GV=1, V=152064, WEIGHT_LATER=True, HAS_COUNT=True,
                               BLOCK_V=8192), {}, 16, 1),  # grpo_loss's default: weights applied here
    ("_scale_rows_kernel", dict(STRIDE_GV=1, BLOCK_V=4096), {}, 8, 3),
]


def compile_all():
    for name, constexprs, pointers, num_warps, num_stages in CASES:
        fn = next(getattr(m, name) for m in (kernels, grpo_grad, token_id_check) if hasattr(m, name))
        compile_sm90(fn, signature(fn, constexprs, {**POINTERS, **pointers}), constexprs, num_warps=num_warps,
                     num_stages=num_stages)
        print("compiled", name, {k: v for k, v in constexprs.items() if v is True})


def test_kernels_compile_for_sm90():
    run_compile_script(__file__, expected=len(CASES), timeout=600)


if __name__ == "__main__":
    compile_all()
