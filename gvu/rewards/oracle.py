"""The toy's `oracle` reward: the shapes world's exact evaluator (gvu/toy/world.py evaluate) on the rollout, 1.0 when
the image satisfies its prompt's metadata, else 0.0. The upper bound an intrinsic reward can approach; toy only."""

from __future__ import annotations

import numpy as np
import torch

from gvu.rewards.registry import register_reward


def _toy_only(cfg, backend) -> list[str]:
    if backend.name == "toy":
        return []
    return [
        f"grpo.rewards: oracle is the shapes world's exact evaluator, which reads the toy's rendered scenes; "
        f"model.backend={backend.name!r} does not render them (use oracle with model.backend=toy)"
    ]


@register_reward("oracle", check=_toy_only, metadata=True)
def oracle_reward(backend, model, images, codes, prompts, metas, cfg) -> torch.Tensor:
    """fp32 (N,) of 0.0 / 1.0: the exact evaluator on the pixels read back (the evaluation's own judge)."""
    from gvu.toy import world as W  # the toy world reaches the trainer only through its reward and evaluator

    read = W.read_image(np.asarray(images))
    return torch.tensor([float(W.evaluate(m, c)) for m, c in zip(metas, read, strict=True)], device=codes.device)
