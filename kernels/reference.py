"""PyTorch references for every op in `kernels`: the single ground truth for tests, benchmarks and the fallback.

Each `*_ref` upcasts to fp32 (or to `upcast_dtype`, e.g. fp64 in tests) and builds the full logits, so it
is simple rather than fast. Autograd through them gives the reference gradients. They assume inputs that
`kernels.ops` has validated (shapes, dtypes, targets in range, temperature > 0) and do not check them again.
"""

from __future__ import annotations

import torch


def _gather_logprobs(z: torch.Tensor, targets: torch.Tensor, ignore_index: int, return_entropy: bool):
    """z: (N, V) scaled logits in the compute dtype; targets: (N,) -> fp32 (N,) [, entropy (N,)]."""
    keep = targets != ignore_index
    safe = torch.where(keep, targets, torch.zeros_like(targets)).long()
    logp = torch.log_softmax(z, dim=-1)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    out = torch.where(keep, out, torch.zeros_like(out))
    if not return_entropy:
        return out.float()
    p = logp.exp()
    # p * logp with p == 0 and logp == -inf is 0 (rows of -inf except the target), not NaN. The mask goes on
    # logp, not on the product: where(p > 0, p * logp, 0) still back-propagates 0 * -inf = NaN into the logits.
    plogp = p * torch.where(p > 0, logp, torch.zeros_like(logp))
    ent = -plogp.sum(-1)
    ent = torch.where(keep, ent, torch.zeros_like(ent))
    return out.float(), ent.float()


def token_logprobs_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    upcast_dtype: torch.dtype = torch.float32,
):
    """log softmax(logits / T)[target]: logits (..., V), targets (...) int -> fp32 (...) [, entropy (...)].

    Positions with target == ignore_index give 0 (and 0 entropy) and get zero gradient.
    """
    V = logits.shape[-1]
    lead = targets.shape
    z = logits.reshape(-1, V).to(upcast_dtype) / temperature
    res = _gather_logprobs(z, targets.reshape(-1), ignore_index, return_entropy)
    if return_entropy:
        return res[0].reshape(lead), res[1].reshape(lead)
    return res.reshape(lead)


def linear_token_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    upcast_dtype: torch.dtype = torch.float32,
):
    """log softmax((hidden @ weight.T + bias) / T)[target], materialising all N x V logits.

    hidden (N, D) 2-D, weight (V, D), targets (N,), bias (V,) or None -> fp32 (N,) [, entropy (N,)].
    `chunk_size` is accepted for signature parity and ignored.
    """
    del chunk_size
    logits = hidden.to(upcast_dtype) @ weight.to(upcast_dtype).T
    if bias is not None:
        logits = logits + bias.to(upcast_dtype)
    return token_logprobs_ref(
        logits,
        targets,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        upcast_dtype=upcast_dtype,
    )


SCALES = ("group", "batch", "none")


def group_advantages_ref(
    rewards: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-4,
    scale: str = "group",
    unbiased: bool = True,
) -> torch.Tensor:
    """GRPO advantages: rewards (B*G,) -> fp32 (B*G,), groups are consecutive runs of `group_size`.

    scale="group": (r - mean_g) / (std_g + eps); "batch": divide by the std of all valid rewards; "none":
    only centre. NaN rewards are left out of every statistic and get 0; a group with fewer than two valid
    rewards, or with zero spread, gets 0.
    """
    r = rewards.detach().double().reshape(-1, group_size)
    valid = ~torch.isnan(r)
    n = valid.sum(1, keepdim=True)
    rz = torch.where(valid, r, torch.zeros_like(r))
    mean = rz.sum(1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(valid, r - mean, torch.zeros_like(r))
    big = torch.finfo(r.dtype).max
    spread = torch.where(valid, r, torch.full_like(r, -big)).amax(1, keepdim=True) - torch.where(
        valid, r, torch.full_like(r, big)
    ).amin(1, keepdim=True)
    dead = (n < 2) | (spread <= 0)
    if scale == "group":
        denom = n - 1 if unbiased else n
        std = ((centred**2).sum(1, keepdim=True) / denom.clamp(min=1)).sqrt()
        adv = centred / (std + eps)
    elif scale == "batch":
        flat = r[valid]
        ddof = 1 if unbiased else 0
        std = flat.std(correction=ddof) if flat.numel() > ddof else torch.zeros((), dtype=r.dtype)
        adv = centred / (std + eps)
    else:
        adv = centred
    adv = torch.where(dead | ~valid, torch.zeros_like(adv), adv)
    return adv.reshape(-1).float()
