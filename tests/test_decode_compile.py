"""The decoder's Triton kernels compile for sm_90 (the H200) on a machine without a GPU. The CPU lane runs them
under the interpreter, which accepts code the compiler rejects and has no libdevice (the fused sampler and the
GeLU use CUDA's logf / tanhf through it); a failed compile would otherwise surface only on the lent GPU machine.
Frontend, PTX and ptxas run here, in a subprocess without TRITON_INTERPRET; nothing is launched. Each case is
the launch the decoder makes at a real shape (bf16, Qwen2.5-0.5B / 7B and Gemma 2 2B heads)."""
import pytest

from triton_compile import compile_sm90, run_compile_script

pytest.importorskip("triton")

FLOATS = {"scale", "softcap", "eps", "u_max"}


def signature(fn, constexprs, pointers):
    """Argument types as the launchers pass them: pointers from `pointers` (else bf16), floats, int32 scalars."""
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointers.get(name, "*bf16")
        else:
            types[name] = "fp32" if name in FLOATS else "i32"
    return types


def cases():
    from grm_engine.decode import noise_triton
    from grm_engine.kernels import cascade_attention, gated_act, paged_attention, rms_norm, rotary_store

    int_ptrs = {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "partial_ptr": "*fp32", "stats_ptr": "*fp32",
                "prefix_tokens_ptr": "*i32", "items_ptr": "*i32", "slot_ptr": "*i64"}
    paged = dict(HEAD_DIM=128, NUM_HEADS=28, BLOCK_SIZE=16, BLOCK_G=16, BLOCK_D=128, USE_WINDOW=False,
                 DOT_PRECISION="tf32")
    stacked = dict(HEADS_PER_KV=7, HEAD_DIM=128, NUM_HEADS=28, BLOCK_SIZE=16, BLOCK_D=128, BLOCK_N=64,
                   DOT_PRECISION="tf32")
    return [
        (rms_norm._rms_norm_kernel, dict(HAS_DELTA=True, GEMMA=False, BLOCK=1024), {}, 4),
        (rms_norm._rms_norm_kernel, dict(HAS_DELTA=False, GEMMA=True, BLOCK=4096), {}, 8),
        (rotary_store._rotary_store_kernel, dict(HEAD_DIM=64, BLOCK_H=16, BLOCK_KV=2), int_ptrs, 4),
        (gated_act._gated_act_kernel, dict(GELU_TANH=False, BLOCK=4096, LIBDEVICE_TANH=True), {}, 4),
        (gated_act._gated_act_kernel, dict(GELU_TANH=True, BLOCK=4096, LIBDEVICE_TANH=True), {}, 4),
        (noise_triton._uniform_noise_kernel, dict(BLOCK=1024), {"row_hash_ptr": "*i32", "out_ptr": "*fp32"}, 4),
        (noise_triton._gumbel_argmax_kernel, dict(BLOCK=4096, LIBDEVICE_LOG=True),
         {"logits_ptr": "*fp32", "temperature_ptr": "*fp32", "row_hash_ptr": "*i32", "value_ptr": "*fp32",
          "index_ptr": "*i64"}, 8),
        (paged_attention._store_kv_kernel, dict(ROW=512, BLOCK=512), int_ptrs, 4),
        (paged_attention._paged_decode_kernel, dict(paged, GROUP=7, SINGLE_SPLIT=False, BLOCK_N=64, USE_SOFTCAP=False),
         int_ptrs, 4),
        (paged_attention._paged_decode_kernel,  # Gemma 2: soft-capping, sliding window, head_dim 256, 128-key tiles
         dict(paged, GROUP=2, HEAD_DIM=256, NUM_HEADS=8, BLOCK_D=256, SINGLE_SPLIT=True, BLOCK_N=128,
              USE_SOFTCAP=True, USE_WINDOW=True), int_ptrs, 8),
        (paged_attention._merge_splits_kernel, dict(HEAD_DIM=128, BLOCK_S=8, BLOCK_D=128), int_ptrs, 4),
        (cascade_attention._stacked_rows_attention_kernel,
         dict(stacked, BLOCK_M=64, BLOCK_N=32, IS_SUFFIX=False, FUSE_MERGE=False), int_ptrs, 4),
        (cascade_attention._stacked_rows_attention_kernel,  # one suffix split: the merge fused in (the decoder's case)
         dict(stacked, BLOCK_M=16, IS_SUFFIX=True, FUSE_MERGE=True), int_ptrs, 4),
        (cascade_attention._stacked_rows_attention_kernel, dict(stacked, BLOCK_M=16, IS_SUFFIX=True, FUSE_MERGE=False),
         int_ptrs, 4),
        (cascade_attention._merge_slots_kernel, dict(NUM_HEADS=28, HEAD_DIM=128, BLOCK_D=128), int_ptrs, 4),
    ]


def compile_all():
    for fn, constexprs, pointers, num_warps in cases():
        compile_sm90(fn, signature(fn, constexprs, pointers), constexprs, num_warps=num_warps)
        print("compiled", fn.__name__)


def test_decode_kernels_compile_for_sm90():
    run_compile_script(__file__, expected=len(cases()), timeout=900)


if __name__ == "__main__":
    compile_all()
