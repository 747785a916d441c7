"""Build grm_engine: the Python package, the C++ extension grm_engine._C (always) and the
CUDA extension grm_engine._cuda (when a CUDA toolkit and a CUDA build of torch are present).

Switches, in the spelling flash-attention and PyTorch extensions use:
  GRM_ENGINE_CUDA=0|1     skip / force the CUDA extension (default: build it when possible)
  TORCH_CUDA_ARCH_LIST    architectures for the CUDA extension (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs
"""
import glob
import os
import sys

from setuptools import setup

from pybind11.setup_helpers import Pybind11Extension, build_ext as Pybind11BuildExt

ROOT = os.path.dirname(os.path.abspath(__file__))
# Folders map onto one import namespace (DESIGN.md): kernels/ -> grm_engine.kernels,
# train/ -> grm_engine.train. Never install top-level "kernels" or "train" packages.
PACKAGE_DIR = {"grm_engine": "grm_engine", "grm_engine.kernels": "kernels"}
if os.path.isdir(os.path.join(ROOT, "train")):
    PACKAGE_DIR["grm_engine.train"] = "train"


# folders that hold only data files, installed beside the modules that read them (named as packages so setuptools
# does not warn that an importable-looking folder is missing from `packages`)
DATA_PACKAGES = {"grm_engine.prompt_templates": os.path.join("grm_engine", "prompt_templates")}
if "grm_engine.train" in PACKAGE_DIR:
    DATA_PACKAGES["grm_engine.train.presets"] = os.path.join("train", "presets")


def _packages():
    found = []
    for package, folder in PACKAGE_DIR.items():
        for dirpath, _dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            if "__init__.py" in filenames and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
                found.append(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    return sorted(found)


def _package_dir():
    mapping = dict(PACKAGE_DIR)
    for package in _packages():
        top = ".".join(package.split(".")[:2])
        if package not in mapping and top in PACKAGE_DIR:
            mapping[package] = os.path.join(PACKAGE_DIR[top], *package.split(".")[2:])
    return mapping


cpp_args = ["-O3", "-std=c++17"]
ext_modules = [
    Pybind11Extension(
        "grm_engine._C",
        sorted(glob.glob("csrc/cpu/*.cpp")),
        include_dirs=["csrc/cpu"],
        extra_compile_args=cpp_args,
        cxx_std=17,
    )
]
cmdclass = {"build_ext": Pybind11BuildExt}


def _want_cuda():
    flag = os.environ.get("GRM_ENGINE_CUDA", "").strip()
    if flag == "0":
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        if flag == "1":
            sys.exit("GRM_ENGINE_CUDA=1 but torch is not importable in the build environment; "
                     "install with `pip install --no-build-isolation .`")
        return False
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not have:
        sys.exit(f"GRM_ENGINE_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}: "
                 "the CUDA extension needs a CUDA build of torch and a CUDA toolkit")
    return have


cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
if cuda_sources and _want_cuda():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules.append(
        CUDAExtension(
            "grm_engine._cuda",
            cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc/cuda")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
        )
    )
    # torch's BuildExtension compiles both the pybind11 C++ module and the CUDA one.
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    packages=_packages() + sorted(DATA_PACKAGES),
    package_dir={**_package_dir(), **DATA_PACKAGES},
    package_data={"grm_engine.train.presets": ["*.json"], "grm_engine.prompt_templates": ["*.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
