"""Every Triton kernel compiles to cubin for sm_80 (A100) and sm_90 (H100), in every variant its launcher can pick on
CUDA, on this CPU-only machine; and the shipped configurations do not spill registers.

Triton compiles for a GPUTarget in a child process (this suite runs its interpreter). The first run after a kernel
change compiles 712 variants (~8 min on 2 busy cores, kernels/README.md); the rows are then cached under ~/.cache/gvu
(kernels/triton_ops/cuda_variants.py), so later runs take about a second.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.triton_ops import group_advantages as adv  # noqa: E402
from kernels.triton_ops import linear_token_logprobs as lin  # noqa: E402
from kernels.triton_ops import token_logprobs as tok  # noqa: E402
from kernels.triton_ops._common import PTR, variant_name  # noqa: E402
from kernels.triton_ops.cuda_variants import compile_all_subprocess, occupancy  # noqa: E402

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def rows():
    return compile_all_subprocess((80, 90))


def test_every_variant_compiles_for_both_archs(rows):
    bad = [f"{r['arch']} {r['variant']}: {r['error']}" for r in rows if "error" in r]
    assert not bad, "\n".join(bad)
    names = {a: [r["variant"] for r in rows if r["arch"] == a] for a in ARCHS}
    assert len(set(names["sm_90"])) == len(names["sm_90"]), "duplicate variants"
    assert set(names["sm_80"]) == set(names["sm_90"])
    assert all(r["cubin_bytes"] > 0 and 0 < r["regs"] <= 255 and 0 < r["occupancy"] <= 1 for r in rows)


def test_list_covers_what_cuda_launches(rows):
    # The launch parameters the launchers compute (the same _meta functions they call) for a sweep of vocab sizes,
    # dtypes and flags must each be one of the compiled variants: nothing CUDA can launch is left uncompiled.
    have = {r["variant"] for r in rows if r["arch"] == "sm_90"}
    want = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        d = PTR[dtype][1:]
        for V in (1, 7, 17, 1000, 4096, 4097, 50257, 151936):
            for e in (False, True):
                want.add(variant_name("_token_logprobs_fwd", d, tok._fwd_meta(V, e)))
            for gl, ge in ((True, False), (False, True), (True, True)):
                want.add(variant_name("_token_logprobs_bwd", d, tok._bwd_meta(V, gl, ge, dtype, interp=False)))
        for bias in (False, True):
            # variant_name leaves out INTERP_BF16, which _meta sets under this suite's interpreter.
            fwd = lin._meta(lin._cuda_tiles(dtype, False), dtype, bias, WITH_ENT=True)
            want.add(variant_name("_linear_logprobs_fwd", d, fwd))
            bwd = lin._bwd_meta(lin._cuda_tiles(dtype, True), dtype, bias, True, False, True, False, False)
            want.add(variant_name("_linear_logprobs_bwd", d, bwd))
    for G in (1, 2, 8, 64, 1500):
        for i in (0, 1, 2):
            want.add(variant_name("_group_advantages_kernel", "bf16", adv._meta(G, SCALE=i)))
    assert want <= have, sorted(want - have)[:5]


# kernels/README.md, "Registers and spills": the spills that remain are a few bytes per thread (ptxas saving registers
# around fp64 slow-path calls, or 4-12 B at the 255-register limit on sm_80); the 0.8-11 KB of the old 128 x 128 x 64
# linear tiles must not come back, and the production path (bf16 / fp16 linear on H100) must not spill at all.
MAX_SPILL_BYTES = 64


def test_shipped_configs_do_not_spill(rows):
    big = [f"{r['arch']} {r['variant']}: {r['spill_stores']} B" for r in rows if r["spill_stores"] > MAX_SPILL_BYTES]
    assert not big, "\n".join(big)
    hopper_low = [r for r in rows if r["arch"] == "sm_90" and r["kernel"].startswith("_linear") and "[fp32;" not in
                  r["variant"]]  # fmt: skip
    assert hopper_low and all(r["spill_stores"] == 0 for r in hopper_low)
    assert all(r["spill_stores"] >= 0 for r in rows), "a ptxas log without its spill line"


def test_occupancy_arithmetic():
    # H100 SM: 65536 registers in 256-register warp units, 228 KiB shared memory (+1 KiB reserved per block).
    assert occupancy(63, 32, 8) == (0.5, "registers")  # 2048 regs/warp -> 4 blocks of 8 warps
    assert occupancy(255, 0, 8) == (0.125, "registers")  # 8192 regs/warp -> 1 block
    assert occupancy(32, 100 * 1024, 4) == (2 * 4 / 64, "shared memory")
    assert occupancy(16, 0, 1) == (0.5, "blocks")  # 32 blocks of one warp
