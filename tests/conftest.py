import os

import torch

# On a machine without CUDA, Triton kernels run under the interpreter. Triton reads the
# variable when a kernel is decorated, so it is set here, before any test imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available (pytest -m gpu on the lent H200)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The training tests' tiny base model directory (tests/train_helpers.py build_base: built once per process)."""
    from train_helpers import build_base

    return build_base(tmp_path_factory.mktemp("train_models"))
