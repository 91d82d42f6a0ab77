"""Which implementation runs an op: Triton on CUDA, the C++ CPU ops on CPU when built, else the reference.

`GVU_KERNEL_BACKEND=triton|cpp|torch` (read at call time) or `kernels.use_backend(...)` forces one; a forced
backend that cannot run on the given tensors raises with the reason and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("triton", "cpp", "torch")
_forced: str | None = None


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """Triton's CPU interpreter: must be set before triton is first imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpp_available() -> bool:
    from kernels import cpp_ops

    return cpp_ops.available()


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a `with` block (None restores automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    prev, _forced = _forced, name
    try:
        yield
    finally:
        _forced = prev


def forced_backend() -> str | None:
    if _forced is not None:
        return _forced
    env = os.environ.get("GVU_KERNEL_BACKEND", "").strip().lower()
    if env and env not in BACKENDS:
        raise ValueError(f"GVU_KERNEL_BACKEND={env!r} is not one of {BACKENDS}; unset it or pick one of those")
    return env or None


def choose(device: torch.device) -> str:
    """The backend that will run an op whose inputs live on `device`."""
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("GVU_KERNEL_BACKEND=triton but triton is not installed: `pip install triton`")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"GVU_KERNEL_BACKEND=triton needs CUDA tensors (got {device.type}); "
                "on CPU set TRITON_INTERPRET=1 before importing triton, or use GVU_KERNEL_BACKEND=cpp"
            )
        return "triton"
    if forced == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"GVU_KERNEL_BACKEND=cpp runs on CPU tensors only, got {device.type}")
        if not cpp_available():
            from kernels import cpp_ops

            raise RuntimeError(
                "GVU_KERNEL_BACKEND=cpp but the C++ ops are not built "
                f"({cpp_ops.load_error()}); build them with `pip install --no-build-isolation -e .`"
            )
        return "cpp"
    if device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if device.type == "cpu" and cpp_available():
        return "cpp"
    return "torch"
