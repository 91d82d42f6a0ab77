"""Test setup. Triton runs in its CPU interpreter unless GVU_TEST_CUDA=1 (must precede any triton import)."""

import os

if os.environ.get("GVU_TEST_CUDA", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield 0


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs (deselected in CI with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped on CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
