"""Rewards by name, combined with weights (grpo.rewards) and mixed into GRPO advantages (grpo.reward_mix).

    gvu       GvU's intrinsic reward: the geometric mean of the prompt's token probabilities (intrinsic.py)
    qa        the understanding's probability of the right answers to questions from the GenEval metadata (qa.py)
    yes_prob  p(Yes) / (p(Yes) + p(No)) for "does the image show <prompt>?" (qa.py; Ability.QUESTIONS)
    oracle    the shapes world's exact evaluator (oracle.py; toy only)

A reward is a plain callable registered by name (registry.py: what it receives and returns):

    from gvu.rewards import register_reward

    @register_reward("mine")
    def mine(backend, model, images, codes, prompts, metas, cfg) -> torch.Tensor:   # fp32 (N,)
        ...

score / advantages / metrics (mix.py) are the trainer's reward, advantage and metric lines.
"""

from gvu.rewards import oracle, qa  # noqa: F401  (registers the built-in rewards)
from gvu.rewards.intrinsic import geometric_mean_reward, intrinsic_reward
from gvu.rewards.mix import advantages, combined, metrics, score
from gvu.rewards.registry import Reward, entry_problems, get_reward, register_reward, reward_names, reward_problems

__all__ = [
    "Reward", "advantages", "combined", "entry_problems", "geometric_mean_reward", "get_reward", "intrinsic_reward",
    "metrics", "register_reward", "reward_names", "reward_problems", "score",
]  # fmt: skip
