"""The configured rewards of a rollout, their mix into advantages, and their metrics.

    scores = score(backend, model, images, codes, prompts, metas, cfg)   {name: fp32 (N,)}, grpo.rewards' order
    advantages(scores, cfg.grpo)                                           fp32 (N,)
    metrics(scores, cfg.grpo)                                              reward/* (the mix), reward/<name>/*

grpo.reward_mix:
- "rewards": the advantage of the weighted sum r = sum_k w_k r_k (kernels.group_advantages). A row that any
  weighted reward gives NaN has r = NaN: it is left out of its group's mean and std and gets advantage 0.
- "advantages": sum_k w_k A_k, each A_k the group advantage of reward k alone (CoRL's per-task advantages), so
  each reward is normalised on its own scale. A row NaN for reward k is left out of k's group statistics and
  gets 0 from k only; the other rewards still move it.
A weight of 0 computes and logs a reward without mixing it in (its NaNs leave nothing out).
"""

from __future__ import annotations

import torch

import kernels
from gvu.rewards.registry import get_reward, weights


@torch.no_grad()
def score(backend, model, images, codes, prompts, metas, cfg) -> dict[str, torch.Tensor]:
    """Every reward of grpo.rewards on the N rows -> {name: fp32 (N,)} on the codes' device."""
    out = {}
    for name, _ in weights(cfg.grpo):
        r = get_reward(name).fn(backend, model, images, codes, prompts, metas, cfg)
        r = torch.as_tensor(r).to(device=codes.device, dtype=torch.float32)
        if r.shape != (len(metas),):
            raise ValueError(f"reward {name!r} returned shape {tuple(r.shape)}; it must return ({len(metas)},)")
        out[name] = r
    return out


def _mixed(terms: list[torch.Tensor]) -> torch.Tensor:
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def combined(scores: dict[str, torch.Tensor], g) -> torch.Tensor:
    """sum_k w_k r_k over the nonzero weights -> fp32 (N,); NaN where a weighted reward is NaN."""
    return _mixed([w * scores[n] for n, w in weights(g) if w != 0])


def advantages(scores: dict[str, torch.Tensor], g) -> torch.Tensor:
    """fp32 (N,) advantages of the rollout under grpo.reward_mix (module docstring); g: cfg.grpo."""

    def adv(r):
        return kernels.group_advantages(r, g.group_size, eps=g.adv_eps, scale=g.scale_rewards)

    if g.reward_mix == "rewards":
        return adv(combined(scores, g))
    return _mixed([w * adv(scores[n]) for n, w in weights(g) if w != 0])


def _stats(r: torch.Tensor, G: int, prefix: str) -> dict[str, float]:
    valid = r[~torch.isnan(r)]
    return {
        f"{prefix}mean": valid.mean().item() if valid.numel() else float("nan"),
        f"{prefix}std": valid.std().item() if valid.numel() > 1 else 0.0,
        f"{prefix}group_std": torch.nan_to_num(r.view(-1, G).std(1)).mean().item(),
    }


def metrics(scores: dict[str, torch.Tensor], g) -> dict[str, float]:
    """reward/{mean,std,group_std} of the weighted sum; reward/<name>/{mean,std,group_std,nan} of each reward."""
    out = _stats(combined(scores, g), g.group_size, "reward/")
    for name, r in scores.items():
        out.update(_stats(r, g.group_size, f"reward/{name}/"))
        out[f"reward/{name}/nan"] = torch.isnan(r).float().mean().item()
    return out
