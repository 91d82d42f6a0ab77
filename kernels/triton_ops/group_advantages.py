"""Triton GRPO group advantages: rewards (M,) = (B*G,) float -> fp32 (M,), groups are consecutive runs of G.

Per group g over its valid (non-NaN) rewards, n_g of them: mean_g, c = r - mean_g, and
    "group": c / (std_g + eps), std_g = sqrt(sum c^2 / (n_g - 1 if unbiased else n_g))
    "batch": c / (std_b + eps), std_b the std of all valid rewards in the batch
    "none":  c
NaN rewards get 0; groups with n_g < 2 or max == min get 0. Statistics are in fp64 like the reference, so
the result matches it to fp32 rounding. One program per group; "batch" adds a per-group statistics kernel
and a one-program reduction (Chan's pairwise merge of (n, mean, M2)) before the same per-group kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops._common import PTR, Variant

# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _group_stats(r_ptr, g, G, BLOCK: tl.constexpr):
    """(n, mean, M2 = sum (r - mean)^2, spread = max - min) over the valid rewards of group g, in fp64."""
    base = r_ptr + g.to(tl.int64) * G
    offs = tl.arange(0, BLOCK)
    n = tl.zeros((), dtype=tl.float64)
    total = tl.zeros((), dtype=tl.float64)
    hi = tl.full((), -float("inf"), dtype=tl.float64)
    lo = tl.full((), float("inf"), dtype=tl.float64)
    for k0 in range(0, G, BLOCK):
        idx = k0 + offs
        r = tl.load(base + idx, mask=idx < G, other=float("nan")).to(tl.float64)
        valid = r == r  # NaN != NaN: NaN rewards (and the padding) drop out of every statistic
        n += tl.sum(valid.to(tl.float64), axis=0)
        total += tl.sum(tl.where(valid, r, 0.0), axis=0)
        hi = tl.maximum(hi, tl.max(tl.where(valid, r, -float("inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(valid, r, float("inf")), axis=0))
    mean = total / tl.maximum(n, 1.0)
    m2 = tl.zeros((), dtype=tl.float64)
    for k0 in range(0, G, BLOCK):  # second pass for M2: no E[r^2] - E[r]^2 cancellation
        idx = k0 + offs
        r = tl.load(base + idx, mask=idx < G, other=float("nan")).to(tl.float64)
        c = tl.where(r == r, r - mean, 0.0)
        m2 += tl.sum(c * c, axis=0)
    return n, mean, m2, hi - lo


@triton.jit
def _group_stats_kernel(r_ptr, stats_ptr, G, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    n, mean, m2, _ = _group_stats(r_ptr, g, G, BLOCK)
    out = stats_ptr + g.to(tl.int64) * 3
    tl.store(out, n)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _batch_std_kernel(stats_ptr, std_ptr, num_groups, ddof, BLOCK: tl.constexpr):
    """One program: merge the per-group (n, mean, M2) into the batch std (0 when n <= ddof)."""
    offs = tl.arange(0, BLOCK)
    n_all = tl.zeros((), dtype=tl.float64)
    sum_all = tl.zeros((), dtype=tl.float64)
    for k0 in range(0, num_groups, BLOCK):
        idx = (k0 + offs).to(tl.int64)
        mask = idx < num_groups
        n = tl.load(stats_ptr + idx * 3, mask=mask, other=0.0)
        mean = tl.load(stats_ptr + idx * 3 + 1, mask=mask, other=0.0)
        n_all += tl.sum(n, axis=0)
        sum_all += tl.sum(n * mean, axis=0)
    mean_all = sum_all / tl.maximum(n_all, 1.0)
    m2_all = tl.zeros((), dtype=tl.float64)
    for k0 in range(0, num_groups, BLOCK):
        idx = (k0 + offs).to(tl.int64)
        mask = idx < num_groups
        n = tl.load(stats_ptr + idx * 3, mask=mask, other=0.0)
        mean = tl.load(stats_ptr + idx * 3 + 1, mask=mask, other=0.0)
        m2 = tl.load(stats_ptr + idx * 3 + 2, mask=mask, other=0.0)
        d = mean - mean_all
        m2_all += tl.sum(m2 + n * d * d, axis=0)
    std = tl.where(n_all > ddof, tl.sqrt(m2_all / tl.maximum(n_all - ddof, 1.0)), 0.0)
    tl.store(std_ptr, std)


@triton.jit
def _group_advantages_kernel(
    r_ptr, adv_ptr, std_ptr, G, eps, unbiased, BLOCK: tl.constexpr, SCALE: tl.constexpr
):  # fmt: skip
    """SCALE: 0 group std, 1 batch std (read from std_ptr), 2 centre only."""
    g = tl.program_id(0)
    n, mean, m2, spread = _group_stats(r_ptr, g, G, BLOCK)
    if SCALE == 0:
        denom = tl.maximum(n - unbiased, 1.0)
        inv = 1.0 / (tl.sqrt(m2 / denom) + eps)
    elif SCALE == 1:
        inv = 1.0 / (tl.load(std_ptr) + eps)
    else:
        inv = tl.full((), 1.0, dtype=tl.float64)
    dead = (n < 2) | (spread <= 0)
    base = g.to(tl.int64) * G
    offs = tl.arange(0, BLOCK)
    for k0 in range(0, G, BLOCK):
        idx = k0 + offs
        mask = idx < G
        r = tl.load(r_ptr + base + idx, mask=mask, other=float("nan")).to(tl.float64)
        adv = tl.where(r == r, (r - mean) * inv, 0.0)
        adv = tl.where(dead, 0.0, adv)
        tl.store(adv_ptr + base + idx, adv.to(tl.float32), mask=mask)


# --------------------------------------------------------------------------------------------- launchers

_SCALE_IDS = {"group": 0, "batch": 1, "none": 2}


def _meta(n: int, **flags) -> dict:
    """BLOCK (and flags) for a loop over n values; also enumerated by cuda_variants."""
    # GRPO groups are 2-64 rewards: one block covers a group; huge groups loop in 1024-wide steps. 4 warps, the
    # Triton default: 1024 lanes at most, fp64 maths is latency- not throughput-bound here.
    return dict(BLOCK=max(16, min(1024, triton.next_power_of_2(max(n, 1)))), **flags, num_warps=4)


def cuda_variants() -> list[Variant]:
    """Every kernel x reward dtype x BLOCK x SCALE the launcher can pick on CUDA (rewards of any float dtype)."""
    blocks = sorted({_meta(2**k)["BLOCK"] for k in range(12)})
    std = dict(stats_ptr="*fp64", std_ptr="*fp64", ddof="fp32")
    out = [Variant(_batch_std_kernel, std, _meta(b)) for b in blocks]
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        r = PTR[dtype]
        adv = dict(r_ptr=r, adv_ptr="*fp32", std_ptr="*fp64", eps="fp32", unbiased="fp32")
        for b in blocks:
            out.append(Variant(_group_stats_kernel, dict(r_ptr=r, stats_ptr="*fp64"), _meta(b)))
            out += [Variant(_group_advantages_kernel, adv, _meta(b, SCALE=i)) for i in _SCALE_IDS.values()]
    return out


# ------------------------------------------------------------------------------------------ functional API
# No autograd.Function: advantages are constants of the policy loss (the reference detaches too).


def group_advantages_triton(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4, scale: str = "group", unbiased: bool = True
) -> torch.Tensor:
    """rewards (B*G,) contiguous float -> fp32 (B*G,) advantages; see the module docstring for the maths.

    Preconditions (checked by kernels.ops): 1-D, B*G a multiple of group_size >= 1, scale in group/batch/none.
    """
    r = rewards.detach().contiguous()
    adv = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    num_groups = r.numel() // group_size
    if num_groups == 0:
        return adv
    std = torch.zeros(1, dtype=torch.float64, device=r.device)
    if scale == "batch":
        stats = torch.empty((num_groups, 3), dtype=torch.float64, device=r.device)
        _group_stats_kernel[(num_groups,)](r, stats, group_size, **_meta(group_size))
        _batch_std_kernel[(1,)](stats, std, num_groups, float(unbiased), **_meta(num_groups))
    meta = _meta(group_size, SCALE=_SCALE_IDS[scale])
    _group_advantages_kernel[(num_groups,)](r, adv, std, group_size, float(eps), float(unbiased), **meta)
    return adv
