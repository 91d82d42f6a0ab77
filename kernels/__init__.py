"""GvU compute kernels: fused token log-probs (from logits or from hidden states) and GRPO group advantages.

Each op has a Triton kernel (CUDA), a C++ CPU op and a PyTorch reference (`*_ref`); see `_backend.choose`.

    >>> import torch, kernels
    >>> logits, targets = torch.randn(4, 10, 50257), torch.randint(0, 50257, (4, 10))
    >>> kernels.token_logprobs(logits, targets).shape
    torch.Size([4, 10])
"""

from kernels._backend import BACKENDS, choose, use_backend
from kernels.ops import group_advantages, linear_token_logprobs, token_logprobs
from kernels.reference import group_advantages_ref, linear_token_logprobs_ref, token_logprobs_ref

__all__ = [
    "BACKENDS",
    "choose",
    "use_backend",
    "token_logprobs",
    "linear_token_logprobs",
    "group_advantages",
    "token_logprobs_ref",
    "linear_token_logprobs_ref",
    "group_advantages_ref",
]
