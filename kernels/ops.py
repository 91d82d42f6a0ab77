"""Public API of `kernels`: validates inputs, flattens leading dims and dispatches to one backend.

Backend contract (each of `triton_ops`, `cpp_ops`): functions `<op>_triton` / `<op>_cpp` taking 2-D logits or
hidden (N, V|D) with a unit last stride, int64 targets (N,) and keyword options, returning `(logp, entropy)`
with entropy None when not requested; both differentiable. The references are in `kernels.reference`.
"""

from __future__ import annotations

import torch

from kernels import _backend
from kernels.reference import (
    SCALES,
    _check_targets,
    group_advantages_ref,
    linear_token_logprobs_ref,
    token_logprobs_ref,
)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be fp32, bf16 or fp16; got {t.dtype} with shape {tuple(t.shape)}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (N, K) with a unit last stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log softmax(logits / T)[targets]: logits (..., V) fp32/bf16/fp16, targets (...) int -> fp32 (...).

    With `return_entropy`, also the entropy of softmax(logits / T) per position, fp32 (...). Differentiable
    w.r.t. logits; extra memory O(N). Positions with target == ignore_index give 0 and get zero gradient.
    """
    _check_float("logits", logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits must be (..., V) and targets (...) with the same leading shape; "
            f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    if logits.device != targets.device:
        raise ValueError(f"logits on {logits.device} but targets on {targets.device}")
    V = logits.shape[-1]
    _check_targets(targets, V, ignore_index)
    lead = targets.shape
    backend = _backend.choose(logits.device)
    if backend == "torch" or targets.numel() == 0:
        return token_logprobs_ref(
            logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
    z, t = _rows(logits), targets.reshape(-1).long()
    if backend == "triton":
        from kernels.triton_ops.token_logprobs import token_logprobs_triton as fn
    else:
        from kernels.cpp_ops import token_logprobs_cpp as fn
    logp, ent = fn(z, t, temperature=float(temperature), ignore_index=int(ignore_index), return_entropy=return_entropy)
    if return_entropy:
        return logp.reshape(lead), ent.reshape(lead)
    return logp.reshape(lead)


def linear_token_logprobs(
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
    """log softmax((hidden @ weight.T + bias) / T)[targets] without ever holding all N x V logits.

    hidden (..., D), weight (V, D), targets (...), bias (V,) or None -> fp32 (...) [, entropy (...)].
    Gradients flow to hidden, weight (accumulated in fp32) and bias. `chunk_size` caps the rows of logits
    held at once (None: the backend's choice).
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"need hidden (..., D) and weight (V, D) with the same D; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}; got {tuple(targets.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},); got {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight and targets must share a device; got {hidden.device}, {weight.device}, {targets.device}"
        )
    _check_targets(targets, weight.shape[0], ignore_index)
    lead = targets.shape
    h, t = _rows(hidden), targets.reshape(-1).long()
    backend = _backend.choose(hidden.device)
    kw = dict(bias=bias, temperature=float(temperature), ignore_index=int(ignore_index), return_entropy=return_entropy)
    if backend == "torch" or t.numel() == 0:
        res = linear_token_logprobs_ref(h, weight, t, **kw)
        logp, ent = res if return_entropy else (res, None)
    else:
        if backend == "triton":
            from kernels.triton_ops.linear_token_logprobs import linear_token_logprobs_triton as fn
        else:
            from kernels.cpp_ops import linear_token_logprobs_cpp as fn
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        logp, ent = fn(h, w, t, chunk_size=chunk_size, **kw)
    if return_entropy:
        return logp.reshape(lead), ent.reshape(lead)
    return logp.reshape(lead)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-4,
    scale: str = "group",
    unbiased: bool = True,
) -> torch.Tensor:
    """GRPO advantages: rewards (B*G,) -> fp32 (B*G,); groups are consecutive runs of `group_size`.

    "group": (r - mean_g) / (std_g + eps); "batch": divide by the batch std; "none": only centre.
    NaN rewards are left out of the statistics and get 0; a group of size 1 or with zero spread gets 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating point, got {rewards.dtype}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    backend = _backend.choose(rewards.device)
    kw = dict(eps=float(eps), scale=scale, unbiased=bool(unbiased))
    if backend == "torch" or rewards.numel() == 0:
        return group_advantages_ref(rewards, group_size, **kw)
    if backend == "triton":
        from kernels.triton_ops.group_advantages import group_advantages_triton as fn
    else:
        from kernels.cpp_ops import group_advantages_cpp as fn
    return fn(rewards.detach().contiguous(), int(group_size), **kw)
