"""kernels.group_advantages on every backend (tests/kernels/conftest.py) against group_advantages_ref.

The statistics are fp64 in every backend, so the result must match the reference to fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import group_advantages_ref


def _rewards(G: int, dtype=torch.float64) -> torch.Tensor:
    """8 groups of G with NaNs, a zero-spread group and (G >= 3) a group with fewer than two valid rewards."""
    r = torch.randn(8 * G, dtype=torch.float64)
    r[3] = float("nan")
    r[1::5] = float("nan")
    if G > 1:
        r[G : 2 * G] = 0.5  # zero spread -> 0
    if G > 2:
        r[2 * G : 3 * G - 1] = float("nan")  # one valid reward -> 0
    return r.to(dtype)


@pytest.mark.parametrize("G", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_matches_reference(backend, G, scale, unbiased):
    r = _rewards(G).to(backend.device)
    kw = dict(eps=1e-4, scale=scale, unbiased=unbiased)
    out = kernels.group_advantages(r, G, **kw)
    ref = group_advantages_ref(r, G, **kw)
    assert out.dtype == torch.float32 and out.shape == r.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    if G == 1:
        assert (out == 0).all()
    if G > 1:
        assert (out[G : 2 * G] == 0).all()
    assert (out[torch.isnan(r)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_large_groups_all_nan_and_empty(backend, dtype):
    r = _rewards(1500, dtype)[: 2 * 1500].to(backend.device)  # groups wider than one 1024-wide Triton block
    torch.testing.assert_close(kernels.group_advantages(r, 1500), group_advantages_ref(r, 1500), rtol=1e-6, atol=1e-6)
    nan = torch.full((8,), float("nan"), device=backend.device, dtype=dtype)
    for scale in ("group", "batch", "none"):
        assert (kernels.group_advantages(nan, 4, scale=scale) == 0).all()
    assert kernels.group_advantages(torch.zeros(0, device=backend.device, dtype=dtype), 4).shape == (0,)


def test_rejects_bad_inputs(backend):
    r = torch.randn(12, device=backend.device)
    with pytest.raises(ValueError, match="multiple of group_size=5"):
        kernels.group_advantages(r, 5)
    with pytest.raises(ValueError, match="multiple of group_size=0"):
        kernels.group_advantages(r, 0)
    with pytest.raises(ValueError, match="1-D"):
        kernels.group_advantages(r.reshape(3, 4), 4)
    with pytest.raises(TypeError, match="floating point"):
        kernels.group_advantages(r.long(), 4)
    with pytest.raises(ValueError, match="scale must be one of"):
        kernels.group_advantages(r, 4, scale="rank")
