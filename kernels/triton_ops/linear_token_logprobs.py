"""Triton fused linear + token log-probs: log softmax((hidden @ weight.T + bias) / T)[target], no N x V logits.

Shapes: hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) int64 -> logp fp32 (N,), entropy fp32 (N,)
or None. With z = (h_n . w_j + b_j) / T:

    forward  (grid: row block x vocab split): tiles z = h_blk @ w_blk.T with tl.dot (fp32 accumulators),
             keeps a per-row online (max m, s = sum exp(z - m), u = sum exp(z - m)(z - m)) over its vocab
             blocks and picks z_target out of the tile that holds it; a tiny O(N x splits) combine gives
             logp = (z_t - m) - log s and H = log s - u / s. Saved: (m, log s), H (O(N)) and the inputs.
    backward (grid: row block x vocab block): recomputes the z tile, forms
             dz = (g_logp (onehot - p) - g_H p (log p + H)) / T, then dH += dz @ w_blk and dW += dz.T @ h_blk
             with fp32 atomics into fp32 buffers (cast to the input dtypes at the end), dbias += colsum(dz).
    FLOPs: 2NDV forward, 6NDV backward (recompute + two products); bytes: O(ND + VD) plus tile re-reads.

`chunk_size` is ignored: the tiling bounds the live logits to one BLOCK_N x BLOCK_V tile per program.
The fp32 atomics make dW/dH summation order (and so the last bits) run-dependent on a GPU.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from kernels.triton_ops._common import DTYPES, PTR, Variant, cast_out, interpreting

# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """acc + a @ b in fp32. INTERP_BF16: Triton 3.9's interpreter multiplies bf16 bit patterns, so feed fp32
    (bf16 x bf16 products are exact in fp32: same result as the tensor cores)."""
    if INTERP_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logit_tile(
    h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, cols, row_mask, col_mask, D, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    """z = (h[rows] @ w[cols].T + b[cols]) / T as a fp32 (BLOCK_N, BLOCK_V) tile; padded columns are -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < D
        h = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & kmask[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, PRECISION, INTERP_BF16)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc * inv_t, -float("inf"))


@triton.jit
def _linear_logprobs_fwd(
    h_ptr, stride_h, w_ptr, stride_w, b_ptr, tgt_ptr,
    m_ptr, s_ptr, u_ptr, zt_ptr,
    N, V, D, inv_t, num_splits, blocks_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, WITH_ENT: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    # 1-D grid (no 65535 limit); consecutive programs share a row block, so its hidden tile is reused from L2.
    pid = tl.program_id(0)
    pid_n = pid // num_splits
    pid_s = pid % num_splits
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_lo = pid_s * blocks_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + blocks_per_split * BLOCK_V, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logit_tile(
            h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, cols, row_mask, col_mask, D, inv_t,
            BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, PRECISION, INTERP_BF16,
        )  # fmt: skip
        # The target logit comes out of the tile already computed (same rounding as the lse it is compared to).
        is_t = cols[None, :] == tgt[:, None]
        hit = tl.sum(is_t.to(tl.int32), axis=1) > 0
        tl.store(zt_ptr + rows, tl.sum(tl.where(is_t, z, 0.0), axis=1), mask=row_mask & hit)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift[:, None])
        if WITH_ENT:
            d = tl.where(e > 0, z - shift[:, None], 0.0)
            u = alpha * (u + tl.where(s > 0, m - shift, 0.0) * s) + tl.sum(e * d, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    part = rows.to(tl.int64) * num_splits + pid_s
    tl.store(m_ptr + part, m, mask=row_mask)
    tl.store(s_ptr + part, s, mask=row_mask)
    if WITH_ENT:
        tl.store(u_ptr + part, u, mask=row_mask)


@triton.jit
def _linear_logprobs_bwd(
    h_ptr, stride_h, w_ptr, stride_w, b_ptr, tgt_ptr, stats_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, D, inv_t, ignore_index, num_v_blocks,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, WITH_G_LOGP: tl.constexpr, WITH_G_ENT: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_n = pid // num_v_blocks
    pid_v = pid % num_v_blocks
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=ignore_index)
    keep = row_mask & (tgt != ignore_index)
    z = _logit_tile(
        h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, cols, row_mask, col_mask, D, inv_t,
        BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, PRECISION, INTERP_BF16,
    )  # fmt: skip
    m = tl.load(stats_ptr + 2 * rows, mask=row_mask, other=0.0)
    log_s = tl.load(stats_ptr + 2 * rows + 1, mask=row_mask, other=0.0)
    logp = (z - m[:, None]) - log_s[:, None]  # not z - lse: exact exponent even for large logits
    p = tl.exp(logp)
    dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if WITH_G_LOGP:
        g = tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0)
        dz += g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if WITH_G_ENT:
        ge = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
        h_ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        dz -= ge[:, None] * p * (tl.where(p > 0, logp, 0.0) + h_ent[:, None])
    dz = tl.where(keep[:, None] & col_mask[None, :], dz * inv_t, 0.0)
    # Tiles with an exactly zero gradient (all rows ignored) skip both products: exact, unlike a threshold.
    if tl.max(tl.abs(dz)) > 0:
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)
        dz_in = cast_out(
            dz, h_ptr.dtype.element_ty, INTERP_BF16
        )  # tensor-core operand; the products still accumulate in fp32
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
        dh_rows = dh_ptr + rows.to(tl.int64)[:, None] * D
        dw_rows = dw_ptr + cols.to(tl.int64)[:, None] * D
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            kmask = ks < D
            if NEED_DH:
                wm = col_mask[:, None] & kmask[None, :]
                w = tl.load(w_rows + ks[None, :], mask=wm, other=0.0)
                dh = _dot(dz_in, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), PRECISION, INTERP_BF16)
                tl.atomic_add(dh_rows + ks[None, :], dh, mask=row_mask[:, None] & kmask[None, :])
            if NEED_DW:
                hm = row_mask[:, None] & kmask[None, :]
                h = tl.load(h_rows + ks[None, :], mask=hm, other=0.0)
                dw = _dot(tl.trans(dz_in), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), PRECISION, INTERP_BF16)
                tl.atomic_add(dw_rows + ks[None, :], dw, mask=col_mask[:, None] & kmask[None, :])


# --------------------------------------------------------------------------------------------- launchers


def _config(device: torch.device, V: int, dtype: torch.dtype, backward: bool) -> dict:
    """Tile sizes and the number of programs to aim for; tl.dot needs every block dim >= 16."""
    if interpreting() or device.type != "cuda":
        # The interpreter runs programs one after another in numpy, so its cost is the program count: small
        # tiles make modest shapes cross several row, vocab and D blocks (and at least two vocab splits); past
        # V = 2048, 1024-wide vocab tiles (V = 50257: 50 blocks, the last partial; 20 s -> 0.8 s fwd+bwd at N=3).
        return dict(BLOCK_N=16, BLOCK_V=32 if V <= 2048 else 1024, BLOCK_D=32, num_warps=4, target_programs=0)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return dict(_cuda_tiles(dtype, backward), target_programs=4 * sms)


def _cuda_tiles(dtype: torch.dtype, backward: bool) -> dict:
    """The CUDA tile configuration of a launch: the largest tiles whose every variant compiles without register
    spills on sm_80 and sm_90 (bench/triton_resources.py; kernels/README.md, "Registers and spills")."""
    # The forward holds the z, exp and entropy tiles at once and the backward z, p, dz and two output slices: at the
    # usual 128 x 128 x 64 GEMM tile both used all 255 registers and spilled 0.8-11 KB per thread (ptxas). The bf16 /
    # fp16 backward keeps the 128 x 128 tile (so its dH / dW atomics stay as they were) with 16-wide D steps; the
    # forward takes 64-row tiles; fp32 (the IEEE-dot precision path, no tensor cores) 64 x 64 tiles in both.
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8)
    if backward:
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=16, num_warps=8)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8)


def _meta(cfg: dict, dtype: torch.dtype, has_bias: bool, **flags) -> dict:
    """Constexprs and num_warps of a launch (forward or backward, by `flags`; also enumerated by cuda_variants)."""
    tiles = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps")}
    # fp32 inputs get true fp32 products (torch's default for matmul), not TF32's 10-bit mantissa.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    interp_bf16 = interpreting() and dtype == torch.bfloat16
    return dict(tiles, HAS_BIAS=has_bias, **flags, PRECISION=precision, INTERP_BF16=interp_bf16)


def _forward(h, w, b, t, inv_t: float, ignore_index: int, with_ent: bool):
    N, D = h.shape
    V = w.shape[0]
    cfg = _config(h.device, V, h.dtype, backward=False)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_blocks, v_blocks = triton.cdiv(N, bn), triton.cdiv(V, bv)
    # Split the vocabulary across programs only as far as needed to fill the GPU: each split costs O(N) of
    # partial state. The interpreter uses two splits so the cross-split combine is always exercised.
    want = max(1, -(-cfg["target_programs"] // n_blocks)) if cfg["target_programs"] else 2
    splits = min(v_blocks, want)
    per_split = triton.cdiv(v_blocks, splits)
    splits = triton.cdiv(v_blocks, per_split)
    f32 = dict(dtype=torch.float32, device=h.device)
    m, s = torch.empty((N, splits), **f32), torch.empty((N, splits), **f32)
    u = torch.empty((N, splits), **f32) if with_ent else s
    zt = torch.zeros(N, **f32)
    _linear_logprobs_fwd[(n_blocks * splits,)](
        h, h.stride(0), w, w.stride(0), b if b is not None else w, t, m, s, u, zt,
        N, V, D, inv_t, splits, per_split, **_meta(cfg, h.dtype, b is not None, WITH_ENT=with_ent),
    )  # fmt: skip
    # Combine the per-split (m, s, u): O(N x splits), negligible next to the N x V x D tile work.
    mx = m.amax(1, keepdim=True)
    shift = torch.where(mx == -float("inf"), torch.zeros_like(mx), mx)
    scale = torch.exp(m - shift)
    s_tot = (s * scale).sum(1)
    log_s = torch.log(s_tot)
    keep = t != ignore_index
    zero = torch.zeros_like(log_s)
    logp = torch.where(keep, (zt - shift[:, 0]) - log_s, zero)
    ent = None
    if with_ent:
        rebased = torch.where(s > 0, m - shift, torch.zeros_like(m)) * s
        u_tot = (scale * (u + rebased)).sum(1)
        ent = torch.where(keep, log_s - u_tot / s_tot, zero)
    stats = torch.stack([torch.where(keep, shift[:, 0], zero), torch.where(keep, log_s, zero)], dim=1)
    return logp, stats, ent


def _backward(h, w, b, t, stats, ent, g_logp, g_ent, inv_t, ignore_index, need_dh, need_dw, need_db):
    N, D = h.shape
    V = w.shape[0]
    cfg = _config(h.device, V, h.dtype, backward=True)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_blocks, v_blocks = triton.cdiv(N, bn), triton.cdiv(V, bv)
    f32 = dict(dtype=torch.float32, device=h.device)
    # fp32 accumulators whatever the input dtype: summing N/BLOCK_N bf16 partial products into a bf16 dW
    # loses the small per-token contributions (Liger's reported precision issue).
    dh = torch.zeros((N, D), **f32) if need_dh else stats  # unused pointers get any valid tensor
    dw = torch.zeros((V, D), **f32) if need_dw else stats
    db = torch.zeros(V, **f32) if need_db else stats
    _linear_logprobs_bwd[(n_blocks * v_blocks,)](
        h, h.stride(0), w, w.stride(0), b if b is not None else w, t, stats,
        ent if ent is not None else stats,
        g_logp if g_logp is not None else stats,
        g_ent if g_ent is not None else stats,
        dh, dw, db, N, V, D, inv_t, ignore_index, v_blocks,
        **_bwd_meta(cfg, h.dtype, b is not None, g_logp is not None, g_ent is not None, need_dh, need_dw, need_db),
    )  # fmt: skip
    return (dh if need_dh else None), (dw if need_dw else None), (db if need_db else None)


def _bwd_meta(cfg, dtype, has_bias, with_g_logp, with_g_ent, need_dh, need_dw, need_db) -> dict:
    flags = dict(WITH_G_LOGP=with_g_logp, WITH_G_ENT=with_g_ent, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db)
    return _meta(cfg, dtype, has_bias, **flags)


def cuda_variants() -> list[Variant]:
    """Every (dtype, constexprs) the launchers above can pick on CUDA (one tile config): bias and entropy on or off
    in the forward; in the backward each upstream-gradient case (logp, entropy, both) x each non-empty set of
    needed gradients (d_bias only with a bias). Bias in the inputs' dtype (another bias dtype changes one load)."""
    out = []
    for dtype in DTYPES:
        x = PTR[dtype]
        fwd = dict(h_ptr=x, w_ptr=x, b_ptr=x, tgt_ptr="*i64", inv_t="fp32")
        fwd.update(m_ptr="*fp32", s_ptr="*fp32", u_ptr="*fp32", zt_ptr="*fp32")
        bwd = dict(h_ptr=x, w_ptr=x, b_ptr=x, tgt_ptr="*i64", inv_t="fp32")
        bwd.update({k: "*fp32" for k in ("stats_ptr", "ent_ptr", "g_logp_ptr", "g_ent_ptr", "dh_ptr", "dw_ptr")})
        bwd["db_ptr"] = "*fp32"
        for has_bias in (False, True):
            for e in (False, True):
                meta = _meta(_cuda_tiles(dtype, False), dtype, has_bias, WITH_ENT=e)
                out.append(Variant(_linear_logprobs_fwd, fwd, meta))
            for gl, ge in ((True, False), (False, True), (True, True)):
                for need in itertools.product((False, True), repeat=3):
                    if any(need) and (has_bias or not need[2]):
                        meta = _bwd_meta(_cuda_tiles(dtype, True), dtype, has_bias, gl, ge, *need)
                        out.append(Variant(_linear_logprobs_bwd, bwd, meta))
    return out


# -------------------------------------------------------------------------------------------- autograd


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy):
        inv_t = 1.0 / temperature
        logp, stats, ent = _forward(hidden, weight, bias, targets, inv_t, ignore_index, return_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, stats, ent)
        ctx.inv_t, ctx.ignore_index, ctx.with_ent = inv_t, ignore_index, return_entropy
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, stats, ent = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        g_ent = g_ent if ctx.with_ent else None
        if (g_logp is None and g_ent is None) or not (need_dh or need_dw or need_db):
            pairs = zip((hidden, weight, bias), (need_dh, need_dw, need_db), strict=True)
            zeros = [torch.zeros_like(x) if need and x is not None else None for x, need in pairs]
            return (*zeros, None, None, None, None)
        g_logp = None if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        dh, dw, db = _backward(
            hidden, weight, bias, targets, stats, ent, g_logp, g_ent, ctx.inv_t, ctx.ignore_index,
            need_dh, need_dw, need_db and bias is not None,
        )  # fmt: skip
        dh = None if dh is None else dh.to(hidden.dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None


def linear_token_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
):
    """log softmax((hidden @ weight.T + bias) / T)[targets]: hidden (N, D), weight (V, D) -> fp32 (N,).

    Returns (logp, entropy or None); gradients for hidden, weight (fp32-accumulated) and bias. Mixed input
    dtypes are computed in the wider one. `chunk_size` is ignored (the tiles already bound memory).
    Preconditions (checked by kernels.ops): N >= 1, targets in [0, V) or ignore_index, bias (V,), temperature > 0.
    """
    del chunk_size
    dtype = torch.promote_types(hidden.dtype, weight.dtype)  # tl.dot needs both operands in one dtype
    h = hidden.to(dtype)
    w = weight.to(dtype)
    h = h if h.stride(-1) == 1 else h.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    b = None if bias is None else bias.contiguous()
    t = targets.contiguous().long()
    return _LinearTokenLogprobs.apply(h, w, b, t, float(temperature), int(ignore_index), bool(return_entropy))
