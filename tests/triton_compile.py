"""Offline compile checks of Triton kernels for sm_90 (the H200), shared by tests/test_*_compile.py. Triton's
interpreter, which runs the CPU lane, accepts code the compiler rejects; these compile each kernel here
(frontend, PTX, ptxas), launching nothing. The interpreter replaces @triton.jit with something the compiler
cannot take, so a test runs its own file as a script in a subprocess without TRITON_INTERPRET."""
import os
import subprocess
import sys

import pytest


def compile_sm90(fn, signature: dict, constexprs: dict, **options):
    """Compiles `fn` for sm_90 with argument types `signature`; fails unless a cubin comes out."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm.get("cubin"), fn.__name__
    return compiled


def run_compile_script(script: str, expected: int, timeout: int) -> None:
    """Runs `script` (a test file whose __main__ compiles its kernels and prints one 'compiled' line each) without
    the interpreter; skips where this Triton has no NVIDIA backend."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception as exc:  # a Triton build without the NVIDIA backend
        pytest.skip(f"no NVIDIA backend in this Triton: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=os.path.dirname(script))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("compiled") == expected
