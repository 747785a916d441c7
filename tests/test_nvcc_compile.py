"""CPU lane: every CUDA source compiles with nvcc for sm_80 and sm_90 (compile only, no GPU).

The .cu files are plain CUDA C++ (DESIGN.md), so this catches a broken kernel before it lands;
torch_binding.cpp needs a CUDA build of torch and is compiled on the GPU machine only.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

CUDA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else None


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_nvcc_compiles(source, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    output = tmp_path / (os.path.basename(source) + f".{arch}.o")
    result = subprocess.run([nvcc, "-c", f"-arch={arch}", "-std=c++17", "-O3", "-Werror", "all-warnings",
                             f"-I{CUDA_DIR}", source, "-o", str(output)], capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc -arch={arch} {os.path.basename(source)} failed:\n{result.stderr}"
    assert output.stat().st_size > 0
