"""Rollout: sampling image tokens from next-token logits (temperature, top-k, top-p, min-p, CFG).

The KV-cache loops live in the model adapters (gvu/models/*), which know their sequence layout; this module
holds what every adapter shares: the sampling settings and the per-step logits -> token function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    """How image tokens are drawn. `cfg_scale` 1.0 means no classifier-free guidance."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    cfg_scale: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(
                f"sampling.temperature must be > 0 (use sampling.greedy=true for argmax); got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 disables it); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1]; got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"sampling.min_p must be in [0, 1); got {self.min_p}")
        if self.cfg_scale < 1:
            raise ValueError(f"sampling.cfg_scale must be >= 1 (1 disables guidance); got {self.cfg_scale}")


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
