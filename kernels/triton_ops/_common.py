"""Helpers shared by the Triton kernels: interpreter detection and a bf16 cast that rounds like the GPU."""

from __future__ import annotations

import os

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
