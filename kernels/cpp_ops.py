"""Python side of the C++ CPU ops (kernels/csrc): loading the library, fake kernels, autograd, backend functions.

The library is `kernels/_C*.so` (built by `pip install --no-build-isolation -e .`), or the file named by
`GVU_KERNELS_LIB`. If it is missing or fails to load, `available()` is False and `load_error()` says why; the
dispatcher in `kernels._backend` then falls back to the PyTorch reference.

Ops (namespace `gvu_kernels`), all on 2-D rows with fp32 outputs:
    token_logprobs(logits (N, V), targets (N,), T, ignore_index, return_entropy) -> logp, lse, entropy (N,)|(0,)
    linear_token_logprobs(hidden (N, D), weight (V, D), targets, bias?, T, ignore_index, return_entropy,
                          chunk_size) -> logp, lse, entropy
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
        gh, gw, gb = torch.ops.gvu_kernels.linear_token_logprobs_backward(
            g_logp, g_lse, g_ent, hidden, weight, targets, bias, lse, ent,
            ctx.temperature, ctx.ignore_index, ctx.chunk_size, mask,
        )  # fmt: skip
        return (gh if mask[0] else None, gw if mask[1] else None, None, gb if mask[2] else None) + (None,) * 4

    torch.library.register_autograd(lib + "linear_token_logprobs", lin_backward, setup_context=lin_setup)
    _register_python_side.done = True


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
    """
    _require()
    logp, _, ent = torch.ops.gvu_kernels.linear_token_logprobs(
        hidden, weight, targets, bias, float(temperature), int(ignore_index), bool(return_entropy),
        int(chunk_size or 0),
    )  # fmt: skip
    return logp, (ent if return_entropy else None)


def group_advantages_cpp(rewards, group_size, *, eps, scale, unbiased):
    """rewards (M,) float -> advantages (M,) fp32, groups are consecutive runs of group_size."""
    _require()
    return torch.ops.gvu_kernels.group_advantages(rewards, int(group_size), float(eps), str(scale), bool(unbiased))
