"""C++ token_logprobs (kernels/csrc/token_logprobs.cpp): fake kernels, autograd, the backend function."""

from __future__ import annotations

import torch

from kernels.cpp_ops._lib import require, reuse_bytes

_OP = "gvu_kernels::token_logprobs"


def register() -> None:
    """Fake kernels and autograd for the schemas of token_logprobs.cpp (called once, by _lib)."""

    @torch.library.register_fake(_OP)
    def _(logits, targets, temperature, ignore_index, return_entropy):
        n = logits.shape[0]
        out = logits.new_empty((n,), dtype=torch.float32)
        ent = logits.new_empty((n if return_entropy else 0,), dtype=torch.float32)
        return out, torch.empty_like(out), ent, logits.new_empty((n, 2), dtype=torch.float32)

    @torch.library.register_fake(_OP + "_backward")
    def _(grad_logp, grad_lse, grad_entropy, logits, targets, stats, entropy, temperature, ignore_index,
          reuse_bytes=0):  # fmt: skip
        return logits.new_empty(logits.shape)

    torch.library.register_autograd(_OP, _backward, setup_context=_setup)


def _setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index, _ = inputs
    _, _, ent, stats = output
    ctx.save_for_backward(logits, targets, stats, ent)
    ctx.mark_non_differentiable(stats)  # backward state: (m, log s) per row, lse's exact form
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.set_materialize_grads(False)  # unused outputs (lse, entropy) give None, not a zeros pass


def _backward(ctx, g_logp, g_lse, g_ent, _g_stats):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    logits, targets, stats, ent = ctx.saved_tensors
    g_ent = g_ent if ent.numel() else None
    g = torch.ops.gvu_kernels.token_logprobs_backward(
        g_logp, g_lse, g_ent, logits, targets, stats, ent, ctx.temperature, ctx.ignore_index, reuse_bytes()
    )
    return g, None, None, None, None


def token_logprobs_cpp(logits, targets, *, temperature, ignore_index, return_entropy):
    """logits (N, V) fp32/bf16/fp16 (unit last stride), targets (N,) int64 -> (logp (N,) fp32, entropy|None).

    Preconditions (checked by kernels.ops): CPU tensors, targets in [0, V) or ignore_index, temperature > 0.
    """
    require()
    logp, _, ent, _ = torch.ops.gvu_kernels.token_logprobs(
        logits, targets, float(temperature), int(ignore_index), bool(return_entropy)
    )
    return logp, (ent if return_entropy else None)
