import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available (pytest -m gpu on the lent H200)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interpret_triton(monkeypatch):
    """Triton kernels on the CPU: TRITON_INTERPRET=1 must be set before triton is imported,
    so the CPU lane sets it for the whole session in .ci/run; this fixture skips if it is not set."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by .ci/run)")
