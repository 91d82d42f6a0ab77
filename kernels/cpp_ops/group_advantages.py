"""C++ group_advantages (kernels/csrc/group_advantages.cpp): fake kernel and the backend function (no autograd:
advantages are constants of the policy loss)."""

from __future__ import annotations

import torch

from kernels.cpp_ops._lib import require


def register() -> None:
    """The fake kernel for the schema of group_advantages.cpp (called once, by _lib)."""

    @torch.library.register_fake("gvu_kernels::group_advantages")
    def _(rewards, group_size, eps, scale, unbiased):
        return rewards.new_empty(rewards.shape, dtype=torch.float32)


def group_advantages_cpp(rewards, group_size, *, eps, scale, unbiased):
    """rewards (M,) float -> advantages (M,) fp32, groups are consecutive runs of group_size.

    Preconditions (checked by kernels.ops, and again in C++): 1-D CPU tensor, M a multiple of group_size >= 1.
    """
    require()
    return torch.ops.gvu_kernels.group_advantages(rewards, int(group_size), float(eps), str(scale), bool(unbiased))
