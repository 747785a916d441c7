"""Which compiled and accelerated paths are available, and the GRM_ENGINE_BACKEND override.

Each op has one dispatcher; it asks `pick(op, candidates)` which path to take. A missing
extension never breaks import: the dispatcher falls back and `backends()` says what exists.
"""
from __future__ import annotations

import importlib
import os

VALID_BACKENDS = ("reference", "cpp", "triton", "cuda")


def _try_import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # an extension that fails to load must not break `import grm_engine`
        return None, f"{type(exc).__name__}: {exc}"


_C, _C_ERROR = _try_import("grm_engine._C")
try:  # the CUDA extension links against torch's libraries (libc10, ...): torch must be loaded first
    import torch  # noqa: F401
except Exception:
    pass
_cuda, _CUDA_ERROR = _try_import("grm_engine._cuda")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _cuda_device_available() -> bool:
    try:
        import torch
    except Exception:
        return False
    return torch.cuda.is_available()


def forced_backend() -> str | None:
    """The backend forced with GRM_ENGINE_BACKEND, or None."""
    value = os.environ.get("GRM_ENGINE_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in VALID_BACKENDS:
        raise ValueError(f"GRM_ENGINE_BACKEND={value!r} is not one of {', '.join(VALID_BACKENDS)}")
    return value


def use_triton(tensor) -> bool:
    """Whether a dispatcher runs its Triton kernel on `tensor`: GRM_ENGINE_BACKEND=reference|triton forces a path
    (triton on CPU tensors needs TRITON_INTERPRET=1, Triton's interpreter); otherwise Triton on CUDA tensors, the
    plain reference elsewhere."""
    forced = forced_backend()
    if forced == "reference":
        return False
    if forced == "triton":
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("GRM_ENGINE_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 (set before "
                               "importing triton) to run the kernels in Triton's interpreter")
        return True
    return tensor.is_cuda


def backends() -> dict:
    """What this install can use: compiled extensions, Triton, a CUDA device, and the forced backend."""
    info = {
        "cpp": _C is not None,
        "cuda_extension": _cuda is not None,
        "triton": _triton_available(),
        "cuda_device": _cuda_device_available(),
        "forced": os.environ.get("GRM_ENGINE_BACKEND") or None,
        "parse_scores": "cpp" if _C is not None else "reference",
    }
    if _C_ERROR:
        info["cpp_error"] = _C_ERROR
    if _cuda is None and _CUDA_ERROR and "No module named" not in _CUDA_ERROR:
        info["cuda_extension_error"] = _CUDA_ERROR
    return info
