"""The intrinsic reward: how likely the model's own understanding finds the prompt given the generated image.

    R(I, T) = exp( (1/L) * sum_j log p(T_j | instruction, I, T_<j) )      (geometric mean over prompt tokens)

The adapter's `prompt_logprobs` runs ONE teacher-forced pass for the whole batch and applies the lm_head
only at prompt positions (kernels.linear_token_logprobs); this module turns those log-probs into rewards.
"""

from __future__ import annotations

import inspect

import torch


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
def intrinsic_reward(adapter, model, images: torch.Tensor, prompts, *, with_eos: bool = False) -> torch.Tensor:
    """R for each (image, prompt) pair: images (N, H, W, 3) uint8, prompts a PromptBatch of N -> (N,) fp32.

    `with_eos` also scores the end of the caption (the paper scores only the prompt's tokens): the prompt must
    then be the whole description, which stops a policy from hedging with extra objects.
    """
    if with_eos:
        if "with_eos" not in inspect.signature(adapter.prompt_logprobs).parameters:
            raise NotImplementedError(
                f"{type(adapter).__name__}.prompt_logprobs cannot score the end token; set grpo.reward_eos=false"
            )
        logp, mask = adapter.prompt_logprobs(model, images, prompts, with_eos=True)
    else:
        logp, mask = adapter.prompt_logprobs(model, images, prompts)
    return geometric_mean_reward(logp, mask)
