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


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("nvcc")


def _object(build_dir, source: str, arch: str):
    return build_dir / (os.path.basename(source) + f".{arch}.o")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_nvcc_compiles(source, arch, build_dir):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    output = _object(build_dir, source, arch)
    result = subprocess.run([nvcc, "-c", f"-arch={arch}", "-std=c++17", "-O3", "-Werror", "all-warnings",
                             f"-I{CUDA_DIR}", source, "-o", str(output)], capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc -arch={arch} {os.path.basename(source)} failed:\n{result.stderr}"
    assert output.stat().st_size > 0


LAUNCHER_CALLS = r"""
#include "grm_cuda.h"
int main() {  // every launcher, as grm_cuda.h declares it, with zero rows: returns before any CUDA call
  using namespace grm_cuda;
  int failures = 0;
  failures += launch_parse_scores_from_tokens(nullptr, false, 0, 0, 0, nullptr, nullptr, nullptr, nullptr, nullptr,
                                              0, 1.0, 10.0, nullptr, 0, nullptr, 0) != cudaSuccess;
  failures += launch_vote(0, 1, 1, nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr, nullptr, nullptr,
                          nullptr, 0) != cudaSuccess;
  failures += launch_rule_reward(0, 1, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0) != cudaSuccess;
  return failures;
}
"""


def test_launchers_link_with_their_declarations(build_dir):
    """A launcher defined with a signature other than grm_cuda.h's would only fail at import on the GPU."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    objects = [_object(build_dir, source, "sm_80") for source in SOURCES]
    if not all(o.exists() for o in objects):
        pytest.skip("the sm_80 objects were not built (run the whole file)")
    caller = build_dir / "launcher_calls.cu"
    caller.write_text(LAUNCHER_CALLS)
    binary = build_dir / "launcher_calls"
    result = subprocess.run([nvcc, "-arch=sm_80", "-std=c++17", f"-I{CUDA_DIR}", str(caller), *map(str, objects),
                             "-o", str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, f"linking the launchers failed:\n{result.stderr}"
    assert subprocess.run([str(binary)]).returncode == 0
