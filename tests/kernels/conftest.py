"""The `backend` fixture: every test that takes it runs once per backend available on this machine.

torch (the reference) always; cpp when kernels/_C*.so is built; triton on CUDA with GVU_TEST_CUDA=1, else under
Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before anything imports triton).
`@pytest.mark.backends("cpp", "torch")` limits a test to those (e.g. shapes too big for the interpreter).
"""

from __future__ import annotations

import pytest
import torch
from _compare import Backend, available_backends

import kernels


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run the `backend` fixture only for these backends")


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("backends")
    names = [b for b in available_backends() if mark is None or b in mark.args]
    metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request):
    b = Backend.named(request.param)
    with kernels.use_backend(b.name):
        assert kernels.choose(torch.device(b.device)) == b.name
        yield b
