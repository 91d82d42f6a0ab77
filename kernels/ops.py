"""Public API of `kernels`: the one layer that validates inputs; it flattens leading dims and dispatches.

Every check lives here; backends trust their inputs and state their preconditions instead:
    `kernels.triton_ops.<op>.<op>_triton`, `kernels.cpp_ops.<op>.<op>_cpp`: 2-D logits or hidden (N, V|D) with a
    unit last stride, int64 targets (N,) in [0, V) or ignore_index, N >= 1, keyword options already typed;
    return `(logp, entropy)` with entropy None when not requested, both differentiable.
    `kernels.reference.<op>_ref`: the same maths on the same validated inputs (any leading dims for logits).
"""

from __future__ import annotations

import importlib

import torch

from kernels import _backend
from kernels.reference import SCALES, group_advantages_ref, linear_token_logprobs_ref, token_logprobs_ref

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int64, torch.int32, torch.int16, torch.uint8)


# ------------------------------------------------------------------------------------------------- checks


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be fp32, bf16 or fp16; got {t.dtype} with shape {tuple(t.shape)}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if targets.dtype not in _INTS:
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if targets.numel() == 0 or targets.device.type != "cpu":  # no host sync on GPU: out of range is undefined there
        return
    valid = targets[targets != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
        raise IndexError(
            f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"got min {int(valid.min())}, max {int(valid.max())}"
        )


def _check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"inputs must share a device; got {', '.join(f'{k} on {v}' for k, v in devices.items())}")


# ----------------------------------------------------------------------------------------------- dispatch


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (N, K) with a unit last stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _impl(op: str, backend: str):
    """The backend function `kernels.<backend>_ops.<op>.<op>_<backend>` (imported on first use: triton is optional)."""
    return getattr(importlib.import_module(f"kernels.{backend}_ops.{op}"), f"{op}_{backend}")


def _shaped(logp, ent, lead, return_entropy):
    return (logp.reshape(lead), ent.reshape(lead)) if return_entropy else logp.reshape(lead)


# --------------------------------------------------------------------------------------------------- ops


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
    _check_temperature(temperature)
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits must be (..., V) and targets (...) with the same leading shape; "
            f"got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    _check_same_device(logits=logits, targets=targets)
    _check_targets(targets, logits.shape[-1], ignore_index)
    kw = dict(temperature=float(temperature), ignore_index=int(ignore_index), return_entropy=bool(return_entropy))
    backend = _backend.choose(logits.device)
    if backend == "torch" or targets.numel() == 0:
        return token_logprobs_ref(logits, targets, **kw)
    logp, ent = _impl("token_logprobs", backend)(_rows(logits), targets.reshape(-1).long(), **kw)
    return _shaped(logp, ent, targets.shape, return_entropy)


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
    Gradients flow to whichever of hidden, weight (accumulated in fp32) and bias require grad. When only hidden
    does (a frozen head: LoRA, GvU), the C++ op's forward also saves E = sum_j p_j W_j so its backward needs no
    logits recompute; that choice follows from `requires_grad` alone. `chunk_size` caps the rows of logits held
    at once (None: the backend's choice; the Triton tiles ignore it).
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    _check_temperature(temperature)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"need hidden (..., D) and weight (V, D) with the same D; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}; got {tuple(targets.shape)}"
        )
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be (V,) = ({weight.shape[0]},); got {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    _check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    _check_targets(targets, weight.shape[0], ignore_index)
    h, t = _rows(hidden), targets.reshape(-1).long()
    kw = dict(bias=bias, temperature=float(temperature), ignore_index=int(ignore_index), return_entropy=return_entropy)
    backend = _backend.choose(hidden.device)
    if backend == "torch" or t.numel() == 0:
        res = linear_token_logprobs_ref(h, weight, t, **kw)
        logp, ent = res if return_entropy else (res, None)
    else:
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        logp, ent = _impl("linear_token_logprobs", backend)(h, w, t, chunk_size=chunk_size, **kw)
    return _shaped(logp, ent, targets.shape, return_entropy)


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
    kw = dict(eps=float(eps), scale=scale, unbiased=bool(unbiased))
    backend = _backend.choose(rewards.device)
    if backend == "torch" or rewards.numel() == 0:
        return group_advantages_ref(rewards, group_size, **kw)
    return _impl("group_advantages", backend)(rewards.detach().contiguous(), int(group_size), **kw)
