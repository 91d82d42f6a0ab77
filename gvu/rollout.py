"""Rollout: sampling image tokens from next-token logits (temperature, top-k, top-p, min-p, CFG).

The KV-cache loops live in the backends (gvu/models/*, gvu/toy/backend.py), which know their sequence layout;
this module holds what every backend shares: the per-step logits -> token functions.
"""

from __future__ import annotations

import torch

from gvu.config import SamplingConfig  # the sampling settings live with the other config sections

__all__ = ["SamplingConfig", "cfg_combine", "filter_logits", "sample_next"]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + s * (cond - uncond). (N, V) -> (N, V)."""
    return uncond + scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled, top-k / top-p / min-p filtered fp32 logits (N, V); filtered entries are -inf."""
    z = logits.float() / cfg.temperature
    V = z.shape[-1]
    if cfg.top_k and cfg.top_k < V:
        kth = torch.topk(z, cfg.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if cfg.min_p > 0:
        p = torch.softmax(z, dim=-1)
        z = z.masked_fill(p < cfg.min_p * p.amax(-1, keepdim=True), float("-inf"))
    if cfg.top_p < 1:
        sorted_z, idx = torch.sort(z, dim=-1, descending=True)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop_sorted = (cum - torch.softmax(sorted_z, dim=-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (N, V) -> (N,) int64."""
    if cfg.greedy:
        return logits.argmax(-1)
    z = filter_logits(logits, cfg)
    probs = torch.softmax(z, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
