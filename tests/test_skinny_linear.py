"""The split-K skinny linear (kernels/skinny_linear.py) against its reference, linear_reference in
grm_engine.decode.models.linear: CPU under TRITON_INTERPRET=1 on small fp32 shapes (partial tiles in N and K,
bias, row-strided views, split and unsplit launches, a poisoned workspace); the decoder gives the same greedy
tokens with DecoderConfig.skinny_linear on and off; sm_90 compiles offline. GPU: bf16 at the Qwen2.5-0.5B and
7B projection shapes, run-to-run bit equality, CUDA-graph capture and replay."""
import pytest
import torch
import torch.nn.functional as F

from grm_engine.decode.models.linear import linear_reference, skinny_linear
from triton_compile import run_compile_script

pytest.importorskip("triton")

from grm_engine.kernels import skinny_linear as kernel  # noqa: E402

SPLIT = kernel.SkinnyConfig(block_n=16, block_k=32, split_k=3)  # 70 / 16: a partial N tile; 200 / 32: a partial K chunk
UNSPLIT = kernel.SkinnyConfig(block_n=32, block_k=64, split_k=1)
SHAPES_05B = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864)}
SHAPES_7B = {"qkv_7b": (4608, 3584), "o_7b": (3584, 3584), "gate_up_7b": (37888, 3584), "down_7b": (3584, 18944)}


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "triton")


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """The rows of every skinny_linear_triton launch from here on (the launcher still runs)."""
    calls = []
    launcher = kernel.skinny_linear_triton

    def counting(x, weight, bias=None, config=None):
        calls.append(x.shape[0])
        return launcher(x, weight, bias, config)

    monkeypatch.setattr(kernel, "skinny_linear_triton", counting)
    return calls


def fp32_close(ours, ref, in_features):
    # one fp32 rounding per term at most, summed in another order: |error| <~ K * eps * |x||w| (here |x w| ~ 1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=in_features * 2e-7)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("config", [None, SPLIT, UNSPLIT], ids=["default", "split", "unsplit"])
def test_matches_reference_on_cpu(rows, with_bias, config, triton_backend):
    g = torch.Generator().manual_seed(rows)
    merged = torch.randn(rows, 300, generator=g)
    x = merged[:, 40:240]  # a column view of a wider output, as the decoder passes: row stride 300
    weight = torch.randn(70, 200, generator=g)
    bias = torch.randn(70, generator=g) if with_bias else None
    assert x.stride() == (300, 1)
    ours = skinny_linear(x, weight, bias, config=config)
    assert ours.shape == (rows, 70) and ours.dtype == x.dtype
    fp32_close(ours, linear_reference(x, weight, bias), 200)
    exact = F.linear(x.double(), weight.double(), bias.double() if bias is not None else None)
    fp32_close(ours.double(), exact, 200)


def test_poisoned_workspace_and_counters_come_back_zero(triton_backend):
    """Every partial the last program sums was written by this call (stale NaN partials change nothing), and each
    tile's counter is back at 0 afterwards (the next call, or a graph replay, starts clean)."""
    g = torch.Generator().manual_seed(3)
    x, weight = torch.randn(7, 200, generator=g), torch.randn(70, 200, generator=g)
    skinny_linear(x, weight, config=SPLIT)  # makes the arena
    partials, counters = kernel._WORKSPACES[x.device]
    partials.fill_(float("nan"))
    ours = skinny_linear(x, weight, config=SPLIT)
    fp32_close(ours, linear_reference(x, weight), 200)
    assert int(counters.abs().sum()) == 0


def test_column_strided_x_and_balanced_splits(triton_backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(96, 9, generator=g).t()  # [9, 96], column stride 9: copied once, then the kernel
    weight = torch.randn(40, 96, generator=g)
    for split_k in (2, 3, 7):  # 96 / 16 = 6 chunks: 3 -> 3 splits of 2 chunks, 7 -> 6 splits, none empty
        config = kernel.SkinnyConfig(block_n=16, block_k=16, split_k=split_k)
        fp32_close(skinny_linear(x, weight, config=config), linear_reference(x, weight), 96)
    assert kernel.balanced_split(3, 96, 16) == (3, 32)
    assert kernel.balanced_split(7, 96, 16) == (6, 16)
    assert kernel.balanced_split(4, 200, 32) == (4, 64)  # 7 chunks: 2, 2, 2, 1


def test_default_config_fills_the_gpu_with_a_short_tail():
    """The launch heuristic at the real shapes: between half and 2.5x the SMs busy, at most TAIL_ELEMENTS partials
    re-read by a tile's last program, whole chunks of K per split."""
    for rows in (1, 16, 32, 64, 128):
        for n, k in {**SHAPES_05B, **SHAPES_7B}.values():
            config = kernel.default_config(rows, n, k, num_sms=132)
            split, k_per_split = kernel.balanced_split(config.split_k, k, config.block_k)
            programs = -(-n // config.block_n) * split
            assert 66 <= programs <= 330, (rows, n, k, config)
            assert split == 1 or split * kernel.block_rows(rows) * config.block_n <= kernel.TAIL_ELEMENTS
            assert k_per_split % config.block_k == 0 and (split - 1) * k_per_split < k


def test_tuned_entry_replaces_the_default(triton_backend, monkeypatch):
    """A measured TUNED entry (N, K, BLOCK_M) is the launch for every row count of its bucket, and only there."""
    tuned = kernel.SkinnyConfig(block_n=64, block_k=16, split_k=5)
    monkeypatch.setitem(kernel.TUNED, (70, 200, 16), tuned)
    assert kernel.choose_config(9, 70, 200, 132) == tuned and kernel.choose_config(16, 70, 200, 132) == tuned
    assert kernel.choose_config(17, 70, 200, 132) == kernel.default_config(17, 70, 200, 132)
    launched, original = [], kernel.balanced_split

    def spy(*args):  # the launcher balances the chosen config's split_k over K chunks of its block_k
        launched.append(args)
        return original(*args)

    monkeypatch.setattr(kernel, "balanced_split", spy)
    x, weight = torch.randn(9, 200), torch.randn(70, 200)
    fp32_close(skinny_linear(x, weight), linear_reference(x, weight), 200)
    assert launched == [(5, 200, 16)]


def test_errors_name_the_problem(triton_backend):
    x, weight = torch.randn(4, 32), torch.randn(8, 32)
    with pytest.raises(ValueError, match="129 rows.*F.linear"):
        skinny_linear(torch.randn(129, 32), weight)
    with pytest.raises(TypeError, match="one dtype"):
        skinny_linear(x, weight.double())
    with pytest.raises(ValueError, match="K = 32"):
        skinny_linear(torch.randn(4, 31), weight)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        skinny_linear(x[None], weight)
    with pytest.raises(ValueError, match="bias must be"):
        skinny_linear(x, weight, torch.randn(9))
    with pytest.raises(ValueError, match="unit column stride"):
        skinny_linear(x, torch.randn(32, 8).t())


def test_reference_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("GRM_ENGINE_BACKEND", "reference")
    x, weight, bias = torch.randn(3, 20), torch.randn(6, 20), torch.randn(6)
    assert torch.equal(skinny_linear(x, weight, bias), linear_reference(x, weight, bias))


def test_decoder_greedy_tokens_same_with_the_flag(triton_backend, kernel_calls):
    """A tiny random-init Qwen2 (q/k/v bias, merged projections) decodes the same greedy tokens with
    skinny_linear on and off; with it on, the kernel serves every decode-step projection and no prefill."""
    from grm_engine.decode import Decoder, SamplingParams
    from test_decode_models import make_prompts, tiny_model

    model = tiny_model("qwen2", seed=2)
    prompts = [make_prompts()[0], [7], list(range(40, 52))]  # 5, 1 and 12 tokens (the interpreter is slow)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=True)
    results = {}
    for flag in (False, True):
        decoder = Decoder.from_pretrained(model, num_kv_blocks=64, block_size=4, max_num_seqs=8, skinny_linear=flag)
        assert decoder.config.skinny_linear is flag
        results[flag] = [r.outputs[0] for r in decoder.generate(prompts, params, use_tqdm=False)]
        assert bool(kernel_calls) is flag
    assert [s.token_ids for s in results[True]] == [s.token_ids for s in results[False]]
    for on, off in zip(results[True], results[False]):
        torch.testing.assert_close(torch.tensor(on.logprobs), torch.tensor(off.logprobs), atol=1e-4, rtol=1e-4)
    # 2 layers x (qkv, o, gate_up, down) per decode step; 3 decode steps of 3 rows (prefill made the first token)
    assert kernel_calls == [3] * (8 * 3)


def test_bench_script_smoke(tmp_path):
    """bench/gpu_skinny_linear.py's table and sweep logic on tiny shapes under the interpreter (the GPU run is paid
    for by the minute: a broken script should fail here)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(tmp_path))
    done = subprocess.run([sys.executable, "bench/gpu_skinny_linear.py", "--smoke"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "skinny_linear.jsonl").read_text().splitlines()]
    assert [r["section"] for r in rows].count("skinny_table") == 4 and rows[-1]["section"] == "skinny_summary"
    assert all(r["max_abs_error"] < 1e-4 for r in rows if r["section"] == "skinny_table")
    assert any(r["section"] == "skinny_sweep" and r["tried"] > 2 for r in rows)
    for entry in rows[-1]["tuned_entries"]:  # pastes into TUNED as is
        (key, config), = eval("{" + entry + "\n}", {"SkinnyConfig": kernel.SkinnyConfig}).items()
        assert key == (40, 300, 16) and isinstance(config, kernel.SkinnyConfig)


# ---- sm_90 compile (offline) --------------------------------------------------------------------------------

def compile_cases():
    """bf16 launches of the default configs (split and not, a ragged K), and the fp32 (ieee) one of the GPU tests."""
    common = dict(HAS_BIAS=True, EVEN_K=True, BLOCK_K=128, DOT_PRECISION="tf32")
    return [dict(common, SPLIT_K=4, BLOCK_M=64, BLOCK_N=32), dict(common, SPLIT_K=1, BLOCK_M=16, BLOCK_N=64),
            dict(common, SPLIT_K=2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, HAS_BIAS=False, EVEN_K=False),
            dict(common, SPLIT_K=4, BLOCK_M=16, BLOCK_N=32, DOT_PRECISION="ieee")]


def compile_all():
    """As launched at the real shapes: pointers and the sizes/strides that are multiples of 16 carry Triton's
    divisibility hint, so the loads compile to the pipelined cp.async path (without it: scalar loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel._skinny_linear_kernel
    aligned = [i for i, name in enumerate(fn.arg_names) if name.endswith("_ptr") or name in (
        "out_features", "in_features", "stride_x", "stride_weight", "stride_out", "k_per_split")]
    for constexprs in compile_cases():
        floats = "*fp32" if constexprs["DOT_PRECISION"] == "ieee" else "*bf16"
        signature = {name: "constexpr" if name in constexprs else floats if name.endswith("_ptr") else "i32"
                     for name in fn.arg_names}
        signature.update(partial_ptr="*fp32", counter_ptr="*i32")
        source = ASTSource(fn, signature, constexprs, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
        ptx = compiled.asm["ptx"]
        assert compiled.asm.get("cubin") and "cp.async" in ptx, constexprs
        if constexprs["SPLIT_K"] > 1:  # one thread bumps the counter, right after a barrier over the partial stores
            assert ptx.count("atom.global.gpu.acq_rel.add") == 1, constexprs
            before, _ = ptx.split("atom.global.gpu.acq_rel.add")
            assert any("bar.sync" in line for line in before.splitlines()[-12:]), constexprs
        print("compiled", constexprs)


def test_kernel_compiles_for_sm90():
    run_compile_script(__file__, expected=len(compile_cases()), timeout=600)


# ---- GPU lane ------------------------------------------------------------------------------------------------

def bf16_inputs(rows, n, k, with_bias, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(torch.bfloat16)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16) if with_bias else None
    return x, weight, bias


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32, 64, 128])
@pytest.mark.parametrize("name", list(SHAPES_05B) + list(SHAPES_7B))
def test_bf16_error_within_twice_cublas(name, rows):
    """Error against the fp32 product at most 2x that of cuBLAS in bf16 (both round an fp32 sum once)."""
    n, k = {**SHAPES_05B, **SHAPES_7B}[name]
    x, weight, bias = bf16_inputs(rows, n, k, with_bias=name.startswith("qkv"))
    exact = linear_reference(x.float(), weight.float(), bias.float() if bias is not None else None)
    ours = skinny_linear(x, weight, bias)
    cublas_error = (F.linear(x, weight, bias).float() - exact).abs().max().item()
    our_error = (ours.float() - exact).abs().max().item()
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    assert our_error <= 2 * cublas_error + 1e-6, f"{name} M={rows}: {our_error:.3g} vs cuBLAS {cublas_error:.3g}"
    del exact


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["o", "down", "qkv_7b"])
def test_repeated_calls_are_bit_identical(name):
    """The last program sums partials in split order, whichever program arrives last: same bits every call. The
    workspace is poisoned with NaN before each call: a partial read before its writer published it (a broken
    release/acquire pairing) would show up as NaN."""
    n, k = {**SHAPES_05B, **SHAPES_7B}[name]
    x, weight, _ = bf16_inputs(64, n, k, with_bias=False, seed=1)
    first = skinny_linear(x, weight)
    assert kernel.default_config(64, n, k).split_k > 1 and torch.isfinite(first).all()
    partials, counters = kernel._WORKSPACES[x.device]
    for _ in range(50):
        partials.fill_(float("nan"))
        assert torch.equal(skinny_linear(x, weight), first)
    assert int(counters.abs().sum()) == 0


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    """A decode step's pattern: 24 layers of qkv and gate_up (on a row view of a merged output), o and down,
    captured in one graph after one eager call; replays with new inputs match the reference, every layer gives
    the same bits, and every counter is back at 0."""
    names = list(SHAPES_05B)
    weights = {name: bf16_inputs(1, *SHAPES_05B[name], with_bias=name == "qkv", seed=i)[1:]
               for i, name in enumerate(names)}
    merged = torch.empty(64, 1024, device="cuda", dtype=torch.bfloat16)
    inputs = {"qkv": merged[:, 64:64 + 896], "gate_up": merged[:, 64:64 + 896],  # row stride 1024
              "o": torch.empty(64, 896, device="cuda", dtype=torch.bfloat16),
              "down": torch.empty(64, 4864, device="cuda", dtype=torch.bfloat16)}

    def step():
        return [skinny_linear(inputs[name], *weights[name]) for _ in range(24) for name in names]

    for tensor in (merged, inputs["o"], inputs["down"]):
        tensor.normal_()
    step()  # eager: compiles, sizes the workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in range(3):
        g = torch.Generator("cuda").manual_seed(seed)
        for tensor in (merged, inputs["o"], inputs["down"]):
            tensor.copy_(torch.randn(tensor.shape, device="cuda", generator=g))
        for out in captured:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for name, out in zip(names, captured):
            weight, bias = weights[name]
            exact = linear_reference(inputs[name].float(), weight.float(), bias.float() if bias is not None else None)
            cublas_error = (F.linear(inputs[name], weight, bias).float() - exact).abs().max().item()
            assert (out.float() - exact).abs().max().item() <= 2 * cublas_error + 1e-6, name
        assert all(torch.equal(a, b) for a, b in zip(captured[:4], captured[-4:]))  # the last layer's = the first's
    assert int(kernel._WORKSPACES[merged.device][1].abs().sum()) == 0


@pytest.mark.gpu
def test_decoder_with_cuda_graphs_same_tokens_with_the_flag():
    """fp32 on the GPU (ieee dots; cuBLAS without TF32): the flag changes no sampled token through the captured
    decode graphs (warm-up, padded buckets, split-K launches: qkv 384 x 256, down 256 x 512)."""
    from decode_helpers import medium_prompts
    from grm_engine.decode import Decoder, SamplingParams
    from test_decode_gpu import medium_model

    model = medium_model("qwen2")
    params = SamplingParams(n=8, temperature=0.8, max_tokens=32, seed=3, ignore_eos=True, logprobs=True)
    results = {}
    for flag in (False, True):
        decoder = Decoder.from_pretrained(model, num_kv_blocks=1024, block_size=16, max_num_seqs=32, skinny_linear=flag)
        results[flag] = [s for r in decoder.generate(medium_prompts(), params, use_tqdm=False) for s in r.outputs]
        assert decoder.stats.extra.get("cuda_graphs"), "the decode steps did not run from CUDA graphs"
    assert [s.token_ids for s in results[True]] == [s.token_ids for s in results[False]]
    for on, off in zip(results[True], results[False]):
        torch.testing.assert_close(torch.tensor(on.logprobs), torch.tensor(off.logprobs), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_decoder_bf16_greedy_with_the_flag_against_transformers(family, kernel_calls, monkeypatch):
    """bf16 decode steps through the kernel: every greedy token is fp32 transformers' best or a near tie (within 4x
    transformers' own bf16 error), as the decoder's GPU lane checks without the flag."""
    import copy

    from decode_helpers import check_bf16_first_step_and_greedy, medium_prompts
    from grm_engine.decode import Decoder
    from test_decode_gpu import medium_model

    original = Decoder.from_pretrained.__func__
    monkeypatch.setattr(Decoder, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: original(cls, *args, skinny_linear=True, **kwargs)))
    model32 = medium_model(family)
    check_bf16_first_step_and_greedy(model32, copy.deepcopy(model32).to(torch.bfloat16), medium_prompts(), monkeypatch,
                                     label=family)
    assert kernel_calls, "the decode steps did not use the kernel"


if __name__ == "__main__":
    compile_all()
