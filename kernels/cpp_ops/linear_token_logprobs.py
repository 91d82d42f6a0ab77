"""C++ linear_token_logprobs (kernels/csrc/linear_token_logprobs.cpp): fake kernels, autograd, backend function.

Three forwards, chosen per call by `forward_kind` (what needs a gradient, and memory) to do the fewest GEMM FLOPs
(2NDV each: the forward's logits, every recompute, dH = G W, dW = G^T H, each (N, D) sum):
- "sums", `linear_token_logprobs_frozen`: a frozen head (LoRA / GvU) with hidden needing a gradient. It also
  returns cen = E - W[t] and ent_dir = F + H E (N, D), E = sum_j p_j W_j, F = sum_j p_j log p_j W_j, so hidden's
  gradient is O(N x D) with no recompute and never reads the weight (ZeRO-3 may release it): 4NDV, 6NDV with
  entropy (the recompute backward would also be 6NDV).
- "saved", `linear_token_logprobs_saved`: a trainable head (weight or bias needs a gradient) whose N x V logits fit
  `logits_budget_bytes()`. The forward keeps them; the backward forms G from them and does only dH = G W and
  dW = G^T H: 6NDV (4NDV for the weight alone), what Cut Cross-Entropy's CPU path does.
- "plain", `linear_token_logprobs`: a trainable head past the budget (the backward recomputes logit tiles and
  forms dH and dW from each: 8NDV, against 10NDV with entropy for the sums forward plus a dW recompute, the former
  trainable-head path), a weight alone (6NDV), or no gradient at all.
"""

from __future__ import annotations

import torch

from kernels.cpp_ops._lib import memory_budget_bytes, require, reuse_bytes

_OP = "gvu_kernels::linear_token_logprobs"


def register() -> None:
    """Fake kernels and autograd for the schemas of linear_token_logprobs.cpp (called once, by _lib)."""

    @torch.library.register_fake(_OP)
    def _(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_size):
        n = hidden.shape[0]
        out = hidden.new_empty((n,), dtype=torch.float32)
        return out, torch.empty_like(out), hidden.new_empty((n if return_entropy else 0,), dtype=torch.float32)

    @torch.library.register_fake(_OP + "_frozen")
    def _(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_size):
        n, d = hidden.shape
        out = hidden.new_empty((n,), dtype=torch.float32)
        ent = hidden.new_empty((n if return_entropy else 0,), dtype=torch.float32)
        cen = weight.new_empty((n, d))
        ent_dir = weight.new_empty((n, d) if return_entropy else (0, 0))
        return out, torch.empty_like(out), ent, cen, ent_dir

    tiles = torch.ops.gvu_kernels.fp32_tiles()  # fixed per process

    @torch.library.register_fake(_OP + "_saved")
    def _(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_size, reuse_bytes=0):
        n = hidden.shape[0]
        out = hidden.new_empty((n,), dtype=torch.float32)
        ent = hidden.new_empty((n if return_entropy else 0,), dtype=torch.float32)
        logits = weight.new_empty((n, weight.shape[0]), dtype=_logits_dtype(weight, tiles))
        return out, torch.empty_like(out), ent, logits

    def grads_fake(hidden, weight, bias, output_mask):
        gh = hidden.new_empty(hidden.shape) if output_mask[0] else hidden.new_empty((0,))
        gw = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,))
        gb = bias.new_empty(bias.shape) if (output_mask[2] and bias is not None) else weight.new_empty((0,))
        return gh, gw, gb

    @torch.library.register_fake(_OP + "_backward")
    def _(grad_logp, grad_lse, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature,
          ignore_index, chunk_size, output_mask):  # fmt: skip
        return grads_fake(hidden, weight, bias, output_mask)

    @torch.library.register_fake(_OP + "_saved_backward")
    def _(grad_logp, grad_lse, grad_entropy, logits, hidden, weight, targets, bias, lse, entropy, temperature,
          ignore_index, chunk_size, output_mask):  # fmt: skip
        return grads_fake(hidden, weight, bias, output_mask)

    torch.library.register_autograd(_OP, _backward, setup_context=_setup)
    torch.library.register_autograd(_OP + "_frozen", _frozen_backward, setup_context=_frozen_setup)
    torch.library.register_autograd(_OP + "_saved", _saved_backward, setup_context=_saved_setup)


def _logits_dtype(weight, tiles: bool) -> torch.dtype:
    """The dtype of the forward's logits tiles: weight's, or fp32 when bf16 / fp16 products run in fp32 tiles."""
    return torch.float32 if tiles and weight.dtype != torch.float32 else weight.dtype


def _setup(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index, _, chunk_size = inputs
    _, lse, ent = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse, ent)
    ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
    ctx.set_materialize_grads(False)


def _backward(ctx, g_logp, g_lse, g_ent):
    hidden, weight, targets, bias, lse, ent = ctx.saved_tensors
    return _tile_backward(ctx, None, hidden, weight, targets, bias, lse, ent, g_logp, g_lse, g_ent)


def _saved_setup(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index, _, chunk_size = inputs[:8]  # [8]: reuse_bytes
    _, lse, ent, logits = output
    ctx.save_for_backward(logits, hidden, weight, targets, bias, lse, ent)
    ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
    ctx.mark_non_differentiable(logits)  # backward state, not a result
    ctx.set_materialize_grads(False)


def _saved_backward(ctx, g_logp, g_lse, g_ent, _g_logits):
    logits, hidden, weight, targets, bias, lse, ent = ctx.saved_tensors
    return _tile_backward(ctx, logits, hidden, weight, targets, bias, lse, ent, g_logp, g_lse, g_ent) + (None,)


def _tile_backward(ctx, logits, hidden, weight, targets, bias, lse, ent, g_logp, g_lse, g_ent):
    """The plain and saved forwards' backward: grad-logit tiles from the saved logits, else recomputed."""
    g_ent = g_ent if ent.numel() else None
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(need[3]) and bias is not None]
    if not any(mask):
        return (None,) * 8
    _check_saved_weight(weight, hidden.shape[1])
    common = (hidden, weight, targets, bias, lse, ent, ctx.temperature, ctx.ignore_index, ctx.chunk_size, mask)
    ops = torch.ops.gvu_kernels
    if logits is None:
        gh, gw, gb = ops.linear_token_logprobs_backward(g_logp, g_lse, g_ent, *common)
    else:
        gh, gw, gb = ops.linear_token_logprobs_saved_backward(g_logp, g_lse, g_ent, logits, *common)
    return (gh if mask[0] else None, gw if mask[1] else None, None, gb if mask[2] else None) + (None,) * 4


def _frozen_setup(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index, _, chunk_size = inputs
    _, lse, ent, cen, ent_dir = output
    # hidden's gradient depends on it only through cen / ent_dir, and reads the weight only for an lse gradient
    # (E = cen + W[t]). A trainable head (weight or bias needing a gradient) also keeps hidden, bias and lse for
    # the recompute of its dW / db.
    ctx.head_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    extra = (hidden, bias, lse) if ctx.head_grad else (None, None, None)
    ctx.save_for_backward(weight, targets, ent, cen, ent_dir, *extra)
    ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
    ctx.hidden_dtype, ctx.hidden_shape = hidden.dtype, hidden.shape
    ctx.mark_non_differentiable(cen, ent_dir)  # backward state, not results: no gradient flows through them
    ctx.set_materialize_grads(False)


def _frozen_backward(ctx, g_logp, g_lse, g_ent, _g_cen, _g_ent_dir):
    weight, targets, ent, cen, ent_dir, hidden, bias, lse = ctx.saved_tensors
    g_ent = g_ent if ent.numel() else None
    need = ctx.needs_input_grad
    dh = _hidden_grad(ctx, weight, targets, cen, ent_dir, g_logp, g_lse, g_ent) if need[0] else None
    gw = gb = None
    mask = [False, bool(need[1]), bool(need[3]) and bias is not None]
    if ctx.head_grad and any(mask) and any(g is not None for g in (g_logp, g_lse, g_ent)):
        _check_saved_weight(weight, ctx.hidden_shape[1])
        _, gw, gb = torch.ops.gvu_kernels.linear_token_logprobs_backward(
            g_logp, g_lse, g_ent, hidden, weight, targets, bias, lse, ent,
            ctx.temperature, ctx.ignore_index, ctx.chunk_size, mask,
        )  # fmt: skip
    return (dh, gw if mask[1] else None, None, gb if mask[2] else None) + (None,) * 4


def _hidden_grad(ctx, weight, targets, cen, ent_dir, g_logp, g_lse, g_ent):
    keep = (targets != ctx.ignore_index)[:, None]
    # dH = (g_logp (W[t] - E) + g_lse E - g_ent (F + H E)) / T, in fp32; cen / ent_dir are 0 on ignored rows.
    dh = torch.zeros(ctx.hidden_shape, dtype=torch.float32, device=cen.device)
    if g_logp is not None:
        dh.sub_(g_logp.float()[:, None] * cen)
    if g_ent is not None:
        dh.sub_(g_ent.float()[:, None] * ent_dir)
    if g_lse is not None:
        _check_saved_weight(weight, ctx.hidden_shape[1])
        w_t = weight.index_select(0, torch.where(keep[:, 0], targets, 0).long())
        dh.add_(torch.where(keep, g_lse.float()[:, None], 0.0) * (cen.float() + w_t))
    dh.mul_(1.0 / ctx.temperature)
    return dh.to(ctx.hidden_dtype)


def _check_saved_weight(weight: torch.Tensor, d: int) -> None:
    # ZeRO-3 frees a gathered parameter's storage (param.data = empty(0)) when its GatheredParameters block
    # exits; a weight saved for backward then arrives here with 0 elements. Say so instead of a shape error.
    if weight.dim() != 2 or weight.shape[1] != d:
        raise RuntimeError(
            f"gvu_kernels.linear_token_logprobs backward: the weight saved in forward now has shape "
            f"{tuple(weight.shape)}, not (V, {d}); its storage was released after the forward (ZeRO-3 frees "
            "gathered parameters): keep a copy alive for backward (gvu.models.saveable)"
        )


# GVU_KERNELS_SAVE_LOGITS_MB: the most MiB of N x V logits a trainable head's forward may keep for its backward
# (0: always recompute). Default: min(2 GiB, MemAvailable / 4), read per call; the logits live from the forward to
# the end of the backward, next to everything else the step holds.
_BUDGET_ENV = "GVU_KERNELS_SAVE_LOGITS_MB"


def logits_budget_bytes() -> int:
    """Bytes of N x V logits the saved forward may keep (GVU_KERNELS_SAVE_LOGITS_MB, else the default above)."""
    return memory_budget_bytes(_BUDGET_ENV, "always recompute")


def forward_kind(hidden, weight, bias) -> str:
    """The forward this call takes, "sums", "saved" or "plain" (module docstring): by requires_grad and the budget."""
    if not torch.is_grad_enabled():
        return "plain"
    if not (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return "sums" if hidden.requires_grad else "plain"
    tiles = torch.ops.gvu_kernels.fp32_tiles()
    nbytes = hidden.shape[0] * weight.shape[0] * _logits_dtype(weight, tiles).itemsize
    return "saved" if nbytes <= logits_budget_bytes() else "plain"


def linear_token_logprobs_cpp(
    hidden, weight, targets, *, bias, temperature, ignore_index, return_entropy, chunk_size
):  # fmt: skip
    """hidden (N, D), weight (V, D), targets (N,) int64, bias (V,)|None -> (logp (N,) fp32, entropy|None).

    chunk_size None picks ~64 MiB of logits per chunk (16..1024 rows); see linear_token_logprobs.cpp.
    The forward is the one of `forward_kind` (module docstring): sums for a frozen head, saved logits or a
    recompute backward for a trainable one.
    Preconditions (checked by kernels.ops): CPU tensors, targets in [0, V) or ignore_index, bias (V,), temperature > 0.
    """
    require()
    ops = torch.ops.gvu_kernels
    kind = forward_kind(hidden, weight, bias)
    op = {"sums": ops.linear_token_logprobs_frozen, "saved": ops.linear_token_logprobs_saved}.get(
        kind, ops.linear_token_logprobs
    )
    args = (hidden, weight, targets, bias, float(temperature), int(ignore_index), bool(return_entropy),
            int(chunk_size or 0))  # fmt: skip
    out = op(*args, reuse_bytes()) if kind == "saved" else op(*args)
    return out[0], (out[2] if return_entropy else None)
