"""GRPO maths as pure functions: tensors in, tensors out (tested without a model).

Shapes: N = B*G sequences, L = image tokens per sequence. Log-probs are fp32.

    ratio_t   = exp(logp_t - old_logp_t)
    surrogate = min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A)
    k3 KL     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1           (Schulman's unbiased, positive estimator)
    loss_t    = -surrogate + beta * KL_t, reduced over tokens by the loss type:
      grpo    : mean over each sequence's tokens, then over sequences           (DeepSeekMath)
      bnpo    : sum over tokens / tokens in this micro-batch
      dr_grpo : sum over tokens / (N * L_max)                                   (Dr. GRPO: no length bias)
      dapo    : sum over tokens / tokens in the whole generation batch (`num_tokens`, across ranks)
"""

from __future__ import annotations

import torch

from gvu.config import LOSS_TYPES


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): (N, L) -> (N, L), >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO objective: logp/old_logp/ref_logp (N, L) fp32, advantages (N,), mask (N, L) -> (loss, metrics).

    `old_logp` is the rollout policy's log-probs (equal to logp.detach() on the first update, so the ratio is 1
    and the gradient is A * grad logp). Metrics are detached scalars: kl, clip_frac, ratio.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logp.shape != old_logp.shape or logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"shapes disagree: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, "
            f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)} (want (N, L), (N, L), (N, L), (N,))"
        )
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
    m = mask.to(logp.dtype)
    A = advantages.to(logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * A, clipped * A)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta > 0:
        per_token = per_token + beta * kl

    tokens = m.sum()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / tokens.clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (logp.shape[0] * logp.shape[1])
    else:  # dapo
        denom = tokens if num_tokens is None else torch.as_tensor(num_tokens, dtype=logp.dtype)
        loss = (per_token * m).sum() / denom.clamp(min=1)

    with torch.no_grad():
        is_clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
        denom = tokens.clamp(min=1)
        metrics = {
            "kl": (kl * m).sum() / denom,
            "clip_frac": (is_clipped.to(m.dtype) * m).sum() / denom,
            "ratio": (ratio * m).sum() / denom,
        }
    return loss, metrics
