"""Full-size checks on a CUDA GPU (scripts/gpu_check.sh): V = 151936, N = 8192, offsets past 2^31 elements.

Marked cuda + slow and gated by GVU_TEST_FULL=1 (each allocates several GB). Rows are spot-checked against the fp64
reference (a full fp64 reference would not fit), with the same rule as _compare.py on those rows.
"""

from __future__ import annotations

import os

import pytest
import torch
from _compare import F64, assert_close, err

import kernels
from kernels import linear_token_logprobs_ref, token_logprobs_ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("GVU_TEST_FULL", "0") != "1", reason="full-size GPU check: GVU_TEST_FULL=1"),
]
ROWS = [0, 1, 4095, 4096, 8191]


def test_int64_offsets():
    # N * V > 2^31 elements: row * stride overflows int32 (about 4.7 GB of bf16). Triton is the CUDA default.
    N, V = 15000, 151936
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda")
    assert kernels.choose(x.device) == "triton"
    logp = kernels.token_logprobs(x, t)
    rows = torch.tensor([0, N // 2, N - 1], device="cuda")
    ref = token_logprobs_ref(x[rows], t[rows], upcast_dtype=F64)
    assert err(logp[rows], ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_token_logprobs_qwen_vocab(dtype):
    N, V = 8192, 151936
    x = (torch.randn(N, V, device="cuda") * 3).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    t[::7] = -100
    g, ge = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    logp, ent = kernels.token_logprobs(x, t, temperature=0.9, return_entropy=True)
    (grad,) = torch.autograd.grad((logp * g).sum() + (ent * ge).sum(), x)
    rows = torch.tensor(ROWS, device="cuda")
    xs = x.detach()[rows]
    outs = []
    for z, up in ((xs, None), (xs.to(F64), F64)):
        z = z.clone().requires_grad_()
        kw = dict(temperature=0.9, return_entropy=True) | ({"upcast_dtype": up} if up else {})
        lp, en = token_logprobs_ref(z, t[rows], **kw)
        (gz,) = torch.autograd.grad((lp * g[rows].to(lp.dtype)).sum() + (en * ge[rows].to(en.dtype)).sum(), z)
        outs.append((lp, en, gz))
    (s_lp, s_en, s_g), (r_lp, r_en, r_g) = outs
    assert_close("logp", logp[rows], s_lp, r_lp, 1e-5)
    assert_close("entropy", ent[rows], s_en, r_en, 1e-5)
    assert_close("grad", grad[rows], s_g, r_g, 1e-6)


@pytest.mark.parametrize(("D", "V"), [(2048, 151936), (2048, 16384)])
def test_linear_token_logprobs_full_size(D, V):
    N = 8192
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, D, device="cuda") * D**-0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    logp = kernels.linear_token_logprobs(h, w, t, temperature=0.9)
    dh, dw = torch.autograd.grad((logp * g).sum(), (h, w))
    rows = torch.tensor(ROWS, device="cuda")
    h64 = h.detach()[rows].to(F64).requires_grad_()
    ref = linear_token_logprobs_ref(h64, w.detach().to(F64), t[rows], temperature=0.9, upcast_dtype=F64)
    (dh64,) = torch.autograd.grad((ref * g[rows].to(F64)).sum(), h64)
    # Eager bf16: logits from a bf16 GEMM. The dW check needs all rows: its magnitude and finiteness only.
    eager = token_logprobs_ref(h.detach()[rows] @ w.detach().T, t[rows], temperature=0.9)
    assert_close("logp", logp[rows].detach(), eager, ref, 1e-4)
    assert err(dh[rows], dh64) <= 2**-7 * dh64.abs().max().item() + 1e-6
    assert torch.isfinite(dw).all() and dw.abs().max() > 0
