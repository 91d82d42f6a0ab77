"""Python side of the C++ CPU ops (kernels/csrc): loading the library, fake kernels, autograd, backend functions.

The library is `kernels/_C*.so` (built by `pip install --no-build-isolation -e .`), or the file named by
`GVU_KERNELS_LIB`. If it is missing or fails to load, `available()` is False and `load_error()` says why; the
dispatcher in `kernels._backend` then falls back to the PyTorch reference.

Ops (namespace `gvu_kernels`), all on 2-D rows with fp32 outputs:
    token_logprobs(logits (N, V), targets (N,), T, ignore_index, return_entropy) -> logp, lse, entropy (N,)|(0,)
    linear_token_logprobs(hidden (N, D), weight (V, D), targets, bias?, T, ignore_index, return_entropy,
                          chunk_size) -> logp, lse, entropy
    linear_token_logprobs_frozen(same arguments) -> logp, lse, entropy, cen (N, D), ent_dir (N, D)|(0, 0)
        the forward for a frozen head (hidden needs a gradient, weight and bias do not): the backward is then
        O(N x D) from cen = E - W[t] and ent_dir = F + H E, E = sum_j p_j W_j, F = sum_j p_j log p_j W_j
    group_advantages(rewards (M,), group_size, eps, scale, unbiased) -> (M,)
"""

from __future__ import annotations

import glob
import os

import torch

_LIB_ENV = "GVU_KERNELS_LIB"
_state: dict = {"loaded": None, "error": None, "path": None}


def _candidates() -> list[str]:
    env = os.environ.get(_LIB_ENV)
    if env:
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "libgvu_kernels*.so")))


def _load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    paths = _candidates()
    if not paths:
        _state["error"] = (
            f"no kernels/_C*.so next to {__file__} and {_LIB_ENV} is unset; "
            "build with `pip install --no-build-isolation -e .`"
        )
        _state["loaded"] = False
        return False
    path = paths[0]
    if not os.path.isfile(path):
        _state["error"] = f"{_LIB_ENV}={path} does not exist"
        _state["loaded"] = False
        return False
    try:
        if not hasattr(torch.ops.gvu_kernels, "token_logprobs"):
            torch.ops.load_library(path)
        _register_python_side()
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


def simd_level() -> str:
    """The ISA level of the row kernels the loader picked: avx512, avx2 or baseline."""
    _require()
    return torch.ops.gvu_kernels.simd_level()


def default_chunk_size(n: int, v: int) -> int:
    """Rows per chunk linear_token_logprobs uses when chunk_size is None."""
    _require()
    return torch.ops.gvu_kernels.default_chunk_size(n, v)


def _require() -> None:
    if not _load():
        raise RuntimeError(f"gvu C++ ops unavailable: {_state['error']}")


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels and autograd (registered once, after the library defined the schemas).


def _register_python_side() -> None:
    if getattr(_register_python_side, "done", False):
        return
    lib = "gvu_kernels::"

    @torch.library.register_fake(lib + "token_logprobs")
    def _(logits, targets, temperature, ignore_index, return_entropy):
        n = logits.shape[0]
        out = logits.new_empty((n,), dtype=torch.float32)
        return out, torch.empty_like(out), logits.new_empty((n if return_entropy else 0,), dtype=torch.float32)

    @torch.library.register_fake(lib + "token_logprobs_backward")
    def _(grad_logp, grad_lse, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(lib + "linear_token_logprobs")
    def _(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_size):
        n = hidden.shape[0]
        out = hidden.new_empty((n,), dtype=torch.float32)
        return out, torch.empty_like(out), hidden.new_empty((n if return_entropy else 0,), dtype=torch.float32)

    @torch.library.register_fake(lib + "linear_token_logprobs_frozen")
    def _(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_size):
        n, d = hidden.shape
        out = hidden.new_empty((n,), dtype=torch.float32)
        ent = hidden.new_empty((n if return_entropy else 0,), dtype=torch.float32)
        cen = weight.new_empty((n, d))
        ent_dir = weight.new_empty((n, d) if return_entropy else (0, 0))
        return out, torch.empty_like(out), ent, cen, ent_dir

    @torch.library.register_fake(lib + "linear_token_logprobs_backward")
    def _(grad_logp, grad_lse, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature,
          ignore_index, chunk_size, output_mask):  # fmt: skip
        gh = hidden.new_empty(hidden.shape) if output_mask[0] else hidden.new_empty((0,))
        gw = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,))
        gb = bias.new_empty(bias.shape) if (output_mask[2] and bias is not None) else weight.new_empty((0,))
        return gh, gw, gb

    @torch.library.register_fake(lib + "group_advantages")
    def _(rewards, group_size, eps, scale, unbiased):
        return rewards.new_empty(rewards.shape, dtype=torch.float32)

    def tok_setup(ctx, inputs, output):
        logits, targets, temperature, ignore_index, _ = inputs
        _, lse, ent = output
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.set_materialize_grads(False)  # unused outputs (lse, entropy) give None, not a zeros pass

    def tok_backward(ctx, g_logp, g_lse, g_ent):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, targets, lse, ent = ctx.saved_tensors
        g_ent = g_ent if ent.numel() else None
        g = torch.ops.gvu_kernels.token_logprobs_backward(
            g_logp, g_lse, g_ent, logits, targets, lse, ent, ctx.temperature, ctx.ignore_index
        )
        return g, None, None, None, None

    torch.library.register_autograd(lib + "token_logprobs", tok_backward, setup_context=tok_setup)

    def lin_setup(ctx, inputs, output):
        hidden, weight, targets, bias, temperature, ignore_index, _, chunk_size = inputs
        _, lse, ent = output
        ctx.save_for_backward(hidden, weight, targets, bias, lse, ent)
        ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
        ctx.set_materialize_grads(False)

    def lin_backward(ctx, g_logp, g_lse, g_ent):
        hidden, weight, targets, bias, lse, ent = ctx.saved_tensors
        g_ent = g_ent if ent.numel() else None
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1]), bool(need[3]) and bias is not None]
        if not any(mask):
            return (None,) * 8
        _check_saved_weight(weight, hidden.shape[1])
        gh, gw, gb = torch.ops.gvu_kernels.linear_token_logprobs_backward(
            g_logp, g_lse, g_ent, hidden, weight, targets, bias, lse, ent,
            ctx.temperature, ctx.ignore_index, ctx.chunk_size, mask,
        )  # fmt: skip
        return (gh if mask[0] else None, gw if mask[1] else None, None, gb if mask[2] else None) + (None,) * 4

    torch.library.register_autograd(lib + "linear_token_logprobs", lin_backward, setup_context=lin_setup)

    def frz_setup(ctx, inputs, output):
        hidden, weight, targets, bias, temperature, ignore_index, _, _ = inputs
        _, _, ent, cen, ent_dir = output
        # hidden itself is not needed: dH depends on it only through cen / ent_dir. The weight is read only for
        # an lse gradient (E = cen + W[t]); logp and entropy gradients never touch it.
        ctx.save_for_backward(weight, targets, ent, cen, ent_dir)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.hidden_dtype, ctx.hidden_shape = hidden.dtype, hidden.shape
        ctx.mark_non_differentiable(cen, ent_dir)  # backward state, not results: no gradient flows through them
        ctx.set_materialize_grads(False)

    def frz_backward(ctx, g_logp, g_lse, g_ent, _g_cen, _g_ent_dir):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        weight, targets, ent, cen, ent_dir = ctx.saved_tensors
        g_ent = g_ent if ent.numel() else None
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
        return (dh.to(ctx.hidden_dtype),) + (None,) * 7

    torch.library.register_autograd(lib + "linear_token_logprobs_frozen", frz_backward, setup_context=frz_setup)
    _register_python_side.done = True


def _check_saved_weight(weight: torch.Tensor, d: int) -> None:
    # ZeRO-3 frees a gathered parameter's storage (param.data = empty(0)) when its GatheredParameters block
    # exits; a weight saved for backward then arrives here with 0 elements. Say so instead of a shape error.
    if weight.dim() != 2 or weight.shape[1] != d:
        raise RuntimeError(
            f"gvu_kernels.linear_token_logprobs backward: the weight saved in forward now has shape "
            f"{tuple(weight.shape)}, not (V, {d}); its storage was released after the forward (ZeRO-3 frees "
            "gathered parameters): keep a copy alive for backward (gvu.models.saveable)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Backend functions called by kernels/ops.py (inputs already validated and flattened to rows).


def token_logprobs_cpp(logits, targets, *, temperature, ignore_index, return_entropy):
    """logits (N, V) fp32/bf16/fp16 (unit last stride), targets (N,) int64 -> (logp (N,) fp32, entropy|None)."""
    _require()
    logp, _, ent = torch.ops.gvu_kernels.token_logprobs(
        logits, targets, float(temperature), int(ignore_index), bool(return_entropy)
    )
    return logp, (ent if return_entropy else None)


def linear_token_logprobs_cpp(
    hidden, weight, targets, *, bias, temperature, ignore_index, return_entropy, chunk_size
):  # fmt: skip
    """hidden (N, D), weight (V, D), targets (N,) int64, bias (V,)|None -> (logp (N,) fp32, entropy|None).

    chunk_size None picks ~64 MiB of fp32 logits per chunk (16..256 rows); see linear_token_logprobs.cpp.
    A frozen head (hidden requires grad, weight and bias do not, grad mode on: the LoRA/GvU case) takes
    linear_token_logprobs_frozen, whose backward needs no logits recompute (set GVU_LINEAR_FROZEN=0 to disable).
    """
    _require()
    if _frozen_head(hidden, weight, bias):
        logp, _, ent, _, _ = torch.ops.gvu_kernels.linear_token_logprobs_frozen(
            hidden, weight, targets, bias, float(temperature), int(ignore_index), bool(return_entropy),
            int(chunk_size or 0),
        )  # fmt: skip
        return logp, (ent if return_entropy else None)
    logp, _, ent = torch.ops.gvu_kernels.linear_token_logprobs(
        hidden, weight, targets, bias, float(temperature), int(ignore_index), bool(return_entropy),
        int(chunk_size or 0),
    )  # fmt: skip
    return logp, (ent if return_entropy else None)


def _frozen_head(hidden, weight, bias) -> bool:
    if os.environ.get("GVU_LINEAR_FROZEN", "1") == "0" or not torch.is_grad_enabled() or not hidden.requires_grad:
        return False
    return not weight.requires_grad and not (bias is not None and bias.requires_grad)


def group_advantages_cpp(rewards, group_size, *, eps, scale, unbiased):
    """rewards (M,) float -> advantages (M,) fp32, groups are consecutive runs of group_size."""
    _require()
    return torch.ops.gvu_kernels.group_advantages(rewards, int(group_size), float(eps), str(scale), bool(unbiased))
