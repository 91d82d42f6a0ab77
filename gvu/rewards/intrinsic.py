"""The `gvu` reward (GvU's intrinsic reward): how likely the model's own understanding finds the prompt given the
generated image.

    R(I, T) = exp( (1/L) * sum_j log p(T_j | instruction, I, T_<j) )      (geometric mean over prompt tokens)

The backend's `prompt_logprobs` runs ONE teacher-forced pass for the whole batch and applies the lm_head
only at prompt positions (kernels.linear_token_logprobs); this module turns those log-probs into rewards.
"""

from __future__ import annotations

import torch

from gvu.rewards.registry import register_reward


def geometric_mean_reward(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(mean of the masked token log-probs): logp (N, L) fp32, mask (N, L) bool -> (N,) fp32.

    The mean is taken in log space (a product of L probabilities underflows fp32 for long prompts).
    Rows with no scored token give NaN, which group_advantages leaves out.
    """
    if logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} must have the same shape")
    m = mask.to(logp.dtype)
    n = m.sum(-1)
    mean = (logp * m).sum(-1) / n
    return torch.where(n > 0, mean.exp(), torch.full_like(mean, float("nan"))).float()


@torch.no_grad()
def intrinsic_reward(backend, model, images, prompts, *, with_eos: bool = False) -> torch.Tensor:
    """R for each (image, prompt) pair: images (N, H, W, 3) uint8, prompts a PromptBatch of N -> (N,) fp32.

    `with_eos` (a backend with Ability.END_TOKEN; gvu/validate.py checks) also scores the end of the caption
    (the paper scores only the prompt's tokens): the prompt must then be the whole description, which stops a
    policy from hedging with extra objects.
    """
    logp, mask = backend.prompt_logprobs(model, images, prompts, with_eos=with_eos)
    return geometric_mean_reward(logp, mask)


@register_reward("gvu")
def gvu_reward(backend, model, images, codes, prompts, metas, cfg) -> torch.Tensor:
    """GvU's intrinsic reward R(I, T) of each image for its own prompt (grpo.reward_eos: the end token too)."""
    return intrinsic_reward(backend, model, images, prompts, with_eos=cfg.grpo.reward_eos)
