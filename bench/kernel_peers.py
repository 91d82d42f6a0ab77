"""The implementations bench/kernel_ops.py times: ours (the `kernels` public API), eager, torch.compile and real peers.

token_logprobs (logits (N, V) -> logp (N,)):
  ours     kernels.token_logprobs (C++ op on CPU, Triton on CUDA)
  eager    torch.log_softmax(x.float() / T, -1).gather(...)
  compile  torch.compile of eager
  trl      trl.trainer.utils.selective_log_softmax on (N / 512, 512, V) (TRL's Triton kernel on CUDA, its loop on CPU)
linear_token_logprobs (hidden (N, D), head (V, D) -> logp (N,)):
  ours, ours_recompute (ours with GVU_KERNELS_SAVE_LOGITS_MB=0: a trainable head's recompute backward instead of
  saved logits), eager (h @ W.T then eager), cce (cut_cross_entropy.linear_cross_entropy: torch_compile on CPU, cce on
  CUDA, with h / T for the temperature), liger_flce (LigerFusedLinearCrossEntropyLoss, Triton: CUDA only),
  liger_grpo (LigerFusedLinearGRPOLoss, chunked + torch.compile) against ours_grpo (the same loss on our logp).
Every peer is checked against the fp32 reference on the same inputs before it is timed (`verify`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

import kernels

TEMPERATURE = 0.9
SEQ = 512  # tokens per sequence for the peers that take (B, L, ...) inputs
# GRPO loss for the liger_grpo / ours_grpo pair: beta 0, old log-probs 0 (ratio = p(target)), no clipping
# (epsilon_low 1 and a huge epsilon_high keep the ratio in (0, 1] unclipped), "bnpo" = sum / tokens.
GRPO = dict(beta=0.0, use_ref_model=False, loss_type="bnpo", epsilon_low=1.0, epsilon_high=1e6)

TOKEN_IMPLS = ("ours", "eager", "compile", "trl")
LINEAR_IMPLS = ("ours", "ours_recompute", "eager", "cce", "liger_flce", "ours_grpo", "liger_grpo")
TRAINABLE_ONLY = ("ours_recompute",)  # a frozen head takes the same forward either way
LOSS_IMPLS = ("ours_grpo", "liger_grpo")  # return a scalar loss, not logp; only fwd+bwd is timed
BASELINE = {"liger_grpo": "ours_grpo"}  # the row each impl's ratio is taken against (default: ours)


def eager_logprobs(x, t):
    return torch.log_softmax(x.float() / TEMPERATURE, -1).gather(-1, t[:, None]).squeeze(-1)


def _seqs(n: int) -> tuple[int, int]:
    length = min(SEQ, n)
    return n // length, length


def _advantages(n: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(_seqs(n)[0], generator=g).to(device)


def unavailable(impl: str, device: str) -> str | None:
    """Why impl cannot run here ("skipped: ..." in the table), or None."""
    need = {"trl": "trl", "cce": "cut_cross_entropy", "liger_flce": "liger_kernel", "liger_grpo": "liger_kernel"}
    if impl in need and importlib.util.find_spec(need[impl]) is None:
        return f"{need[impl]} not installed (pip install -e .[bench])"
    if impl == "ours_recompute" and kernels.choose(torch.device(device)) != "cpp":
        return "the saved-logits budget is the C++ backend's; this backend has one backward"
    if impl == "liger_flce" and device != "cuda":
        return "Liger's fused linear cross-entropy is a Triton kernel: CUDA only"
    return None


def make(op: str, impl: str, device: str):
    """fn(*inputs, t) -> logp (N,) fp32, or a scalar loss for LOSS_IMPLS."""
    T = TEMPERATURE
    if op == "token":
        if impl == "ours":
            return lambda x, t: kernels.token_logprobs(x, t, temperature=T)
        if impl == "eager":
            return eager_logprobs
        if impl == "compile":
            return torch.compile(eager_logprobs, dynamic=False)
        if impl == "trl":
            from trl.trainer.utils import selective_log_softmax

            def trl(x, t):
                b, length = _seqs(x.shape[0])
                out = selective_log_softmax(x.view(b, length, -1), t.view(b, length), temperature=T)
                return out.reshape(-1).float()

            return trl
    if impl == "ours":
        return lambda h, w, t: kernels.linear_token_logprobs(h, w, t, temperature=T)
    if impl == "ours_recompute":

        def ours_recompute(h, w, t):
            with _env("GVU_KERNELS_SAVE_LOGITS_MB", "0"):  # read by the forward, which picks the backward
                return kernels.linear_token_logprobs(h, w, t, temperature=T)

        return ours_recompute
    if impl == "eager":
        return lambda h, w, t: eager_logprobs(h @ w.T, t)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        kind = "cce" if device == "cuda" else "torch_compile"
        return lambda h, w, t: -linear_cross_entropy(h / T, w, t, reduction="none", impl=kind).float()
    if impl == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda h, w, t: -flce(w, h / T, t).float()
    if impl == "ours_grpo":

        def ours_grpo(h, w, t):
            b, length = _seqs(h.shape[0])
            lp = kernels.linear_token_logprobs(h, w, t, temperature=T).view(b, length)
            return -(_advantages(h.shape[0], h.device)[:, None] * lp.exp()).sum() / lp.numel()

        return ours_grpo
    if impl == "liger_grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss = LigerFusedLinearGRPOLoss(**GRPO, temperature=T)

        def liger_grpo(h, w, t):
            b, length = _seqs(h.shape[0])
            ones = torch.ones(b, length, device=h.device)
            old = torch.zeros(b, length, device=h.device)
            adv = _advantages(h.shape[0], h.device)
            return loss(h.view(b, length, -1), w, t.view(b, length), ones, adv, old_per_token_logps=old)[0]

        return liger_grpo
    raise ValueError(f"unknown {op} implementation {impl!r}")


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


# ------------------------------------------------------------------------------------------- verification


def _reference(op, inputs, t, rows=256):
    """fp32 reference log-probs for all N rows, a chunk of rows at a time (never N x V at once)."""
    out = []
    with torch.no_grad():
        for i in range(0, t.shape[0], rows):
            if op == "token":
                z = inputs[0][i : i + rows]
            else:
                z = inputs[0][i : i + rows].float() @ inputs[1].float().T
            out.append(kernels.token_logprobs_ref(z, t[i : i + rows], temperature=TEMPERATURE))
    return torch.cat(out)


def _ref_grpo(logp, n):
    b, length = _seqs(n)
    return -(_advantages(n, logp.device)[:, None] * logp.view(b, length).exp()).sum() / logp.numel()


def verify(op: str, impl: str, fn, inputs, t, trainable) -> dict:
    """Max abs error of fn's output (all rows) and of its first input's gradient (first rows) vs the fp32
    reference; raises AssertionError beyond what the inputs' dtype explains."""
    low = inputs[0].dtype != torch.float32
    ref = _reference(op, inputs, t)
    with torch.no_grad():
        out = fn(*inputs, t)
    if impl in LOSS_IMPLS:
        ref = _ref_grpo(ref, t.shape[0])
    err = (out.double() - ref.double()).abs().max().item()
    # bf16 log-probs: TRL's bf16 path runs log_softmax in bf16 (|logp| ~ 10 -> ulp 0.06); logits rounded to bf16
    # by a bf16 GEMM move logp by ~2^-8 |z|.
    tol = (0.02 + 2**-7 * ref.abs().max().item()) if low else 1e-3
    assert err <= tol, f"{op}/{impl} output differs from the reference by {err:.3g} (> {tol:.3g})"
    # Gradients on the first rows (whole sequences for the loss impls); small cases use all rows, so compiled
    # impls do not recompile for a new shape.
    m = t.shape[0] if t.shape[0] <= 2048 else SEQ if impl in LOSS_IMPLS else 64
    sub = [x[:m] if i == 0 else x for i, x in enumerate(inputs)]
    leaves = [x.detach().clone().requires_grad_(tr) for x, tr in zip(sub, trainable, strict=False)]
    ref_leaves = [x.detach().clone().float().requires_grad_(tr) for x, tr in zip(sub, trainable, strict=False)]
    g = torch.randn(m, device=t.device)
    res = fn(*leaves, t[:m])
    (res if impl in LOSS_IMPLS else (res * g).sum()).backward()
    if op == "token":
        ref_out = kernels.token_logprobs_ref(ref_leaves[0], t[:m], temperature=TEMPERATURE)
    else:
        z = ref_leaves[0] @ ref_leaves[1].T
        ref_out = kernels.token_logprobs_ref(z, t[:m], temperature=TEMPERATURE)
    (_ref_grpo(ref_out, m) if impl in LOSS_IMPLS else (ref_out * g).sum()).backward()
    gerr = (leaves[0].grad.double() - ref_leaves[0].grad.double()).abs().max().item()
    gscale = ref_leaves[0].grad.abs().max().item()
    gtol = (2**-6 * gscale + 1e-6) if low else (1e-4 * gscale + 1e-7)
    assert gerr <= gtol, f"{op}/{impl} gradient differs from the reference by {gerr:.3g} (> {gtol:.3g})"
    return {"err": err, "grad_err": gerr}
