"""Helpers shared by the Triton kernels: interpreter detection, a bf16 cast that rounds like the GPU, variant lists."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1, read before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def cast_out(x, dtype: tl.constexpr, BY_HAND: tl.constexpr):
    """fp32 x -> dtype rounding to nearest even, as `cvt.rn` does on the GPU.

    BY_HAND (interpreter only, bf16 only): Triton 3.9's interpreter truncates fp32 -> bf16 by default and its
    "rtne" mode drops the carry into the exponent, so the rounding is done on the bits instead.
    """
    if BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


# ------------------------------------------------------------------------------------ CUDA variant lists
# Each launcher module builds its kernels' constexprs (and num_warps) in one `_*_meta` function that both its
# launch and its `cuda_variants()` call, so the list is what CUDA can launch by construction. The list is compiled
# to cubin offline by kernels/triton_ops/cuda_variants.py (the test suite and bench/triton_resources.py).

PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what kernels.ops lets through for logits / hidden


@dataclass(frozen=True)
class Variant:
    """One compilation of `kernel`: argument types (non-constexpr args default to i32) and its meta-parameters."""

    kernel: Any  # a triton JITFunction
    types: dict  # arg name -> triton type ("*bf16", "fp32", ...)
    meta: dict  # constexprs plus num_warps, as passed at launch

    @property
    def constexprs(self) -> dict:
        return {k: v for k, v in self.meta.items() if k != "num_warps"}

    def signature(self) -> dict:
        names = self.kernel.arg_names
        return {a: "constexpr" if a in self.constexprs else self.types.get(a, "i32") for a in names}

    @property
    def name(self) -> str:
        dtype = next(iter(self.types.values())).lstrip("*")  # the first argument: the input tensor
        return variant_name(self.kernel.__name__, dtype, self.meta)


def variant_name(kernel: str, dtype: str, meta: dict) -> str:
    """'kernel[dtype;K=v,...]', e.g. '_token_logprobs_fwd[bf16;BLOCK_V=4096,WITH_ENT=True,num_warps=8]'."""
    flags = ",".join(f"{k}={v}" for k, v in meta.items() if k != "INTERP_BF16")  # always False on CUDA
    return f"{kernel}[{dtype};{flags}]"
