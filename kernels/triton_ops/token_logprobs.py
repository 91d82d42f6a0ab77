"""Triton token log-probs from materialised logits, with optional entropy, in one pass over the vocabulary.

For a row z = logits[n] / T (V entries) and target t = targets[n]:

    lse      = log sum_j exp(z_j) = m + log s             (online: running max m, s = sum exp(z - m))
    logp     = (z_t - m) - log s                            (not z_t - lse: keeps full precision at |z| ~ 1e4)
    H        = lse - sum_j p_j z_j = log s - u / s        with u = sum_j exp(z_j - m) (z_j - m), p = softmax(z)
    dlogp/dx_j = (onehot_j - p_j) / T
    dH/dx_j    = -p_j (log p_j + H) / T

Shapes: logits (N, V) fp32/bf16/fp16 with unit last stride, targets (N,) int64 -> logp fp32 (N,), entropy fp32
(N,) or None. Rows whose target equals ignore_index give 0 and get a zero gradient. Only (m, log s) and H (O(N)) are
saved for the backward, which re-reads the logits once and writes a new gradient tensor in logits' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops._common import DTYPES, PTR, Variant, cast_out, interpreting

# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _token_logprobs_fwd(
    x_ptr,
    stride_x,
    tgt_ptr,
    logp_ptr,
    stats_ptr,
    ent_ptr,
    V,
    inv_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WITH_ENT: tl.constexpr,
):
    # One program per row; the row index is promoted to int64 so row * stride cannot wrap at 2^31 elements.
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row)
    if tgt == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(stats_ptr + 2 * row, 0.0)
        tl.store(stats_ptr + 2 * row + 1, 0.0)
        if WITH_ENT:
            tl.store(ent_ptr + row, 0.0)
        return
    base = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")  # running max: must start at -inf, not 0 or a large negative finite value
    s = 0.0  # sum exp(z - m)
    u = 0.0  # sum exp(z - m) * (z - m): relative to m so H does not cancel two O(|z|) numbers
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        # Padded columns are -inf so they add exp(-inf) = 0 whatever V is modulo the block.
        z = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A block (or a row so far) of only -inf keeps m = -inf; shift by 0 then to avoid inf - inf = NaN.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        s_blk = tl.sum(e, axis=0)
        if WITH_ENT:
            d = tl.where(e > 0, z - shift, 0.0)
            # Rebase the old u from m to m_new: u' = alpha (u + (m - m_new) s); while s == 0, m is -inf.
            u = alpha * (u + tl.where(s > 0, m - shift, 0.0) * s) + tl.sum(e * d, axis=0)
        s = s * alpha + s_blk
        m = m_new
    log_s = tl.log(s)
    zt = tl.load(base + tgt).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, (zt - m) - log_s)
    # m and log s separately: exp((z - m) - log s) in the backward is exact where exp(z - lse) would lose
    # |lse| * 2^-24 in the exponent (1e-3 relative error in p for logits near 1e4).
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if WITH_ENT:
        tl.store(ent_ptr + row, log_s - u / s)


@triton.jit
def _token_logprobs_bwd(
    x_ptr,
    stride_x,
    dx_ptr,
    stride_dx,
    tgt_ptr,
    stats_ptr,
    ent_ptr,
    g_logp_ptr,
    g_ent_ptr,
    V,
    inv_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WITH_G_LOGP: tl.constexpr,
    WITH_G_ENT: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row)
    base = x_ptr + row * stride_x
    dbase = dx_ptr + row * stride_dx
    cols = tl.arange(0, BLOCK_V)
    if tgt == ignore_index:
        # The gradient buffer is torch.empty: ignored rows must be written, with zeros.
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            tl.store(dbase + idx, tl.zeros([BLOCK_V], dtype=tl.float32).to(dx_ptr.dtype.element_ty), mask=idx < V)
        return
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    g_logp = 0.0
    if WITH_G_LOGP:
        g_logp = tl.load(g_logp_ptr + row)
    g_ent = 0.0
    h = 0.0
    if WITH_G_ENT:
        g_ent = tl.load(g_ent_ptr + row)
        h = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        z = tl.load(base + idx, mask=mask, other=-float("inf")).to(tl.float32) * inv_t
        logp = (z - m) - log_s
        p = tl.exp(logp)
        g = tl.zeros([BLOCK_V], dtype=tl.float32)
        if WITH_G_LOGP:
            g = g_logp * (tl.where(idx == tgt, 1.0, 0.0) - p)
        if WITH_G_ENT:
            # p log p -> 0 where p == 0 (logits of -inf), instead of 0 * -inf = NaN.
            g -= g_ent * p * (tl.where(p > 0, logp, 0.0) + h)
        tl.store(dbase + idx, cast_out(g * inv_t, dx_ptr.dtype.element_ty, BF16_BY_HAND), mask=mask)


# --------------------------------------------------------------------------------------------- launchers


def _block_v(V: int) -> int:
    # 4096 columns = 8 KB of bf16 per iteration: enough bytes in flight per SM to stream at HBM speed with
    # 8 warps, while the (m, s, u) state stays three scalars per row. Small V gets one exact block.
    return max(16, min(4096, triton.next_power_of_2(V)))


def _fwd_meta(V: int, with_ent: bool) -> dict:
    """Constexprs and num_warps of the forward launch (also enumerated by cuda_variants)."""
    block = _block_v(V)
    return dict(BLOCK_V=block, WITH_ENT=with_ent, num_warps=4 if block <= 1024 else 8)


def _bwd_meta(V: int, with_g_logp: bool, with_g_ent: bool, dtype: torch.dtype, interp: bool) -> dict:
    meta = _fwd_meta(V, False)
    del meta["WITH_ENT"]
    return dict(meta, WITH_G_LOGP=with_g_logp, WITH_G_ENT=with_g_ent, BF16_BY_HAND=interp and dtype == torch.bfloat16)


def _forward(x: torch.Tensor, t: torch.Tensor, inv_t: float, ignore_index: int, with_ent: bool):
    N, V = x.shape
    logp = torch.empty(N, dtype=torch.float32, device=x.device)
    stats = torch.empty((N, 2), dtype=torch.float32, device=x.device)  # (m, log s) per row
    ent = torch.empty(N, dtype=torch.float32, device=x.device) if with_ent else logp  # dummy pointer if unused
    if N:
        # 1-D grid over rows: grid x allows 2^31 - 1 programs, y/z only 65535.
        _token_logprobs_fwd[(N,)](x, x.stride(0), t, logp, stats, ent, V, inv_t, ignore_index, **_fwd_meta(V, with_ent))
    return logp, stats, (ent if with_ent else None)


def _backward(x, t, stats, ent, g_logp, g_ent, inv_t: float, ignore_index: int) -> torch.Tensor:
    N, V = x.shape
    dx = torch.empty((N, V), dtype=x.dtype, device=x.device)  # a new tensor: never write into the inputs
    if N:
        meta = _bwd_meta(V, g_logp is not None, g_ent is not None, x.dtype, interpreting())
        _token_logprobs_bwd[(N,)](
            x, x.stride(0), dx, dx.stride(0), t, stats,
            ent if ent is not None else stats,
            g_logp if g_logp is not None else stats,
            g_ent if g_ent is not None else stats,
            V, inv_t, ignore_index, **meta,
        )  # fmt: skip
    return dx


def cuda_variants() -> list[Variant]:
    """Every (dtype, constexprs, num_warps) the launchers above can pick on CUDA: all vocab block sizes, entropy on
    or off, and the three upstream-gradient cases the backward launches (logp, entropy, both)."""
    blocks = sorted({_block_v(2**k) for k in range(20)})
    out = []
    for dtype in DTYPES:
        x = PTR[dtype]
        fwd_types = dict(x_ptr=x, tgt_ptr="*i64", logp_ptr="*fp32", stats_ptr="*fp32", ent_ptr="*fp32", inv_t="fp32")
        bwd_types = dict(fwd_types, dx_ptr=x, g_logp_ptr="*fp32", g_ent_ptr="*fp32")
        for V in blocks:
            out += [Variant(_token_logprobs_fwd, fwd_types, _fwd_meta(V, e)) for e in (False, True)]
            for gl, ge in ((True, False), (False, True), (True, True)):
                out.append(Variant(_token_logprobs_bwd, bwd_types, _bwd_meta(V, gl, ge, dtype, interp=False)))
    return out


# -------------------------------------------------------------------------------------------- autograd


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, return_entropy):
        inv_t = 1.0 / temperature
        logp, stats, ent = _forward(logits, targets, inv_t, ignore_index, return_entropy)
        ctx.save_for_backward(logits, targets, stats, ent)
        ctx.inv_t, ctx.ignore_index, ctx.with_ent = inv_t, ignore_index, return_entropy
        # Unused outputs then arrive as None in backward, so no zero-gradient pass over V is launched for them.
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, stats, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        g_ent = g_ent if ctx.with_ent else None
        g_logp = None if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        if g_logp is None and g_ent is None:
            return torch.zeros_like(logits), None, None, None, None
        dx = _backward(logits, targets, stats, ent, g_logp, g_ent, ctx.inv_t, ctx.ignore_index)
        return dx, None, None, None, None


def token_logprobs_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log softmax(logits / T)[targets]: logits (N, V) unit last stride, targets (N,) int64 -> fp32 (N,).

    Returns (logp, entropy) with entropy fp32 (N,) or None; differentiable w.r.t. logits (also via entropy).
    Preconditions (checked by kernels.ops): targets in [0, V) or ignore_index, temperature > 0.
    """
    targets = targets.contiguous().long()
    logp, ent = _TokenLogprobs.apply(logits, targets, float(temperature), int(ignore_index), bool(return_entropy))
    return logp, ent
