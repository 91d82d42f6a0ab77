"""Loading the C++ library (kernels/_C*.so) and registering each op's Python side once it is loaded.

The library is `kernels/_C*.so` (built by `pip install --no-build-isolation -e .`), or the file named by
`GVU_KERNELS_LIB`. If it is missing or fails to load, `available()` is False and `load_error()` says why; the
dispatcher in `kernels._backend` then falls back to the PyTorch reference.
"""

from __future__ import annotations

import glob
import importlib
import os

import torch

_LIB_ENV = "GVU_KERNELS_LIB"
# One module per op (kernels/cpp_ops/<op>.py, mirroring kernels/csrc/<op>.cpp), each with a register() that adds
# the fake kernels and autograd for the schemas its .cpp defines.
OPS = ("token_logprobs", "linear_token_logprobs", "group_advantages")
_state: dict = {"loaded": None, "error": None, "path": None}
_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # kernels/


def _candidates() -> list[str]:
    env = os.environ.get(_LIB_ENV)
    if env:
        return [env]
    return sorted(glob.glob(os.path.join(_PKG, "_C*.so")) + glob.glob(os.path.join(_PKG, "libgvu_kernels*.so")))


def _load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    paths = _candidates()
    if not paths:
        _state["error"] = (
            f"no kernels/_C*.so in {_PKG} and {_LIB_ENV} is unset; build with `pip install --no-build-isolation -e .`"
        )
        _state["loaded"] = False
        return False
    path = paths[0]
    if not os.path.isfile(path):
        _state["error"] = f"{_LIB_ENV}={path} does not exist"
        _state["loaded"] = False
        return False
    try:
        if not hasattr(torch.ops.gvu_kernels, "simd_level"):
            torch.ops.load_library(path)
        for op in OPS:
            importlib.import_module(f"kernels.cpp_ops.{op}").register()
    except Exception as e:  # a stale build against another torch, missing symbols, ...
        _state["error"] = f"loading {path} failed: {type(e).__name__}: {e}"
        _state["loaded"] = False
        return False
    _state["path"] = path
    _state["loaded"] = True
    return True


def available() -> bool:
    """True when the C++ library is built and loaded (loads it on first call)."""
    return _load()


def load_error() -> str | None:
    """Why the C++ ops are unavailable (None when they are)."""
    _load()
    return _state["error"]


def library_path() -> str | None:
    _load()
    return _state["path"]


def require() -> None:
    if not _load():
        raise RuntimeError(f"gvu C++ ops unavailable: {_state['error']}")


def simd_level() -> str:
    """The ISA level of the row kernels the loader picked: avx512, avx2 or baseline."""
    require()
    return torch.ops.gvu_kernels.simd_level()


def default_chunk_size(n: int, v: int) -> int:
    """Rows per chunk linear_token_logprobs uses when chunk_size is None."""
    require()
    return torch.ops.gvu_kernels.default_chunk_size(n, v)


_BUDGET_CAP = 2 << 30
# GVU_KERNELS_REUSE_MB: the most MiB of each N x V buffer made anew every step (a token backward's gradient, a
# trainable head's saved logits) that the ops keep between calls to write the next one into (0: fresh tensors).
# Default min(2 GiB, MemAvailable / 4), read per call. Reused only once nothing holds the last one (csrc/rows.h:
# reusable_rows): a training loop then writes into mapped pages instead of faulting in N x V new ones each step
# (on CPU torch caches no memory); the buffers stay allocated between steps.
_REUSE_ENV = "GVU_KERNELS_REUSE_MB"


def reuse_bytes() -> int:
    """Bytes of each N x V buffer the ops may keep for reuse (GVU_KERNELS_REUSE_MB, else the default above)."""
    return memory_budget_bytes(_REUSE_ENV, "fresh buffers every call")


def memory_budget_bytes(env: str, zero_means: str) -> int:
    """Bytes from the MiB in environment variable `env`, else min(2 GiB, MemAvailable / 4); read per call.

    A value that is not a number >= 0 is an error naming the variable (`zero_means`: what 0 does, for the message).
    """
    value = os.environ.get(env)
    if value:
        try:
            mib = float(value)
        except ValueError:
            raise ValueError(f"{env}={value!r}: give MiB as a number (0: {zero_means})") from None
        if not mib >= 0:
            raise ValueError(f"{env}={value!r}: must be >= 0 MiB (0: {zero_means})")
        return int(mib * 2**20)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return _BUDGET_CAP
    return min(_BUDGET_CAP, avail // 4)
