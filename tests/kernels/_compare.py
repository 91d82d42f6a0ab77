"""Shared by the kernel tests: the backends on this machine, inputs, and the one comparison rule.

Rule (flash-attention's): err(kernel in dtype) <= 2 * err(PyTorch in the same dtype) + atol, both max abs
differences from the reference in fp64 on the same (already rounded) inputs. "PyTorch in the same dtype" is what
eager code does: for token_logprobs the fp32 log-softmax of the low-precision logits with the gradient returned
in their dtype (`token_logprobs_ref`); for linear_token_logprobs logits from a GEMM in the inputs' dtype
(`h @ W.T + b`), then the same.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

import kernels
from kernels import cpp_ops
from kernels.reference import linear_token_logprobs_ref, token_logprobs_ref

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGN = -100
CUDA = os.environ.get("GVU_TEST_CUDA", "0") == "1" and torch.cuda.is_available()


def available_backends() -> list[str]:
    names = ["torch"]
    if cpp_ops.available():
        names.append("cpp")
    if importlib.util.find_spec("triton") is not None and (CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        names.append("triton")
    return names


@dataclass(frozen=True)
class Backend:
    name: str
    device: str  # where its inputs live: cpu, or cuda for triton with GVU_TEST_CUDA=1
    interpreted: bool  # Triton's CPU interpreter: every program runs in numpy, so keep shapes modest

    @classmethod
    def named(cls, name: str) -> Backend:
        on_cuda = name == "triton" and CUDA
        return cls(name, "cuda" if on_cuda else "cpu", name == "triton" and not on_cuda)

    def impl(self, op: str):
        """The backend function itself (`kernels.<name>_ops.<op>.<op>_<name>`), bypassing kernels.ops."""
        return getattr(importlib.import_module(f"kernels.{self.name}_ops.{op}"), f"{op}_{self.name}")


# ---------------------------------------------------------------------------------------------- comparison


def err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_close(name: str, out: torch.Tensor, same: torch.Tensor, ref64: torch.Tensor, atol: float) -> None:
    """out: kernel, same: PyTorch in the same dtype, ref64: the fp64 reference."""
    assert out.shape == same.shape == ref64.shape and out.dtype == same.dtype, (name, out.dtype, same.dtype)
    assert torch.isfinite(out).all() == torch.isfinite(ref64).all(), name
    e, e_t = err(out, ref64), err(same, ref64)
    assert e <= 2 * e_t + atol, f"{name}: err {e:.3g} > 2 * torch's {e_t:.3g} + {atol:g}"


# -------------------------------------------------------------------------------------------------- inputs


def logits(shape, dtype, device="cpu", scale=3.0) -> torch.Tensor:
    return (torch.randn(shape) * scale).to(dtype).to(device)


def targets(shape, V, device="cpu", ignore_every=3, ignore_index=IGN) -> torch.Tensor:
    """Random targets with every `ignore_every`-th position from 1 on ignored (some in every test with N > 1)."""
    t = torch.randint(0, V, shape)
    if ignore_every:
        t.view(-1)[1::ignore_every] = ignore_index
    return t.to(device)


def upstream(shape, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random upstream gradients for logp and entropy."""
    return torch.randn(shape).to(device), torch.randn(shape).to(device)


# ------------------------------------------------------------------------------------------ token_logprobs


def run_token(fn, x, t, g, ge, with_ent, **kw):
    """(logp, entropy or None, grad w.r.t. x) of fn for the loss sum(g * logp + ge * entropy)."""
    x = x.detach().clone().requires_grad_()
    res = fn(x, t, return_entropy=with_ent, **kw)
    logp, ent = res if with_ent else (res, None)
    loss = (logp * g).sum() + ((ent * ge).sum() if with_ent else 0)
    (grad,) = torch.autograd.grad(loss, x)
    return logp.detach(), (ent.detach() if with_ent else None), grad


def check_token(x, t, *, with_ent=True, temperature=1.0, ignore_index=IGN, atol=1e-5, gatol=1e-6):
    """kernels.token_logprobs (the backend the caller forced) vs the rule above: logp, entropy, grad."""
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    g, ge = upstream(t.shape, x.device)
    out = run_token(kernels.token_logprobs, x, t, g, ge, with_ent, **kw)
    same = run_token(token_logprobs_ref, x, t, g, ge, with_ent, **kw)
    ref = run_token(token_logprobs_ref, x.to(F64), t, g.double(), ge.double(), with_ent, upcast_dtype=F64, **kw)
    assert out[0].dtype == torch.float32 and out[2].dtype == x.dtype and out[2].shape == x.shape
    assert_close("logp", out[0], same[0], ref[0], atol)
    if with_ent:
        assert_close("entropy", out[1], same[1], ref[1], atol)
    assert_close("grad", out[2], same[2], ref[2], gatol)
    keep = t != ignore_index
    assert (out[0][~keep] == 0).all() and (out[2][~keep] == 0).all()
    if with_ent:
        assert (out[1][~keep] == 0).all()
    return out


# ------------------------------------------------------------------------------------ linear_token_logprobs


def eager_linear(h, w, t, bias=None, chunk_size=None, **kw):
    """What eager PyTorch does in the inputs' dtype: logits from a bf16/fp16 GEMM, then fp32 log-softmax."""
    z = h.to(w.dtype) @ w.T
    return token_logprobs_ref(z + bias if bias is not None else z, t, **kw)


def ref_linear(h, w, t, chunk_size=None, **kw):
    return linear_token_logprobs_ref(h, w, t, upcast_dtype=F64, **kw)


def run_linear(fn, h, w, b, t, g, ge, with_ent, grads=("hidden", "weight", "bias"), **kw):
    """(logp, entropy|None, d_hidden|None, d_weight|None, d_bias|None); only the inputs in `grads` require grad."""
    names = ("hidden", "weight", "bias")
    leaves = [
        None if x is None else x.detach().clone().requires_grad_(n in grads)
        for x, n in zip((h, w, b), names, strict=True)
    ]
    res = fn(leaves[0], leaves[1], t, bias=leaves[2], return_entropy=with_ent, **kw)
    logp, ent = res if with_ent else (res, None)
    loss = (logp * g).sum() + ((ent * ge).sum() if with_ent else 0)
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad(loss, wanted))
    grads_out = [next(got) if x is not None and x.requires_grad else None for x in leaves]
    return (logp.detach(), ent.detach() if with_ent else None, *grads_out, res)


def check_linear(h, w, b, t, *, with_ent=True, temperature=1.0, ignore_index=IGN, chunk_size=None,
                 grads=("hidden", "weight", "bias"), atol=1e-5, gatol=1e-5):  # fmt: skip
    """kernels.linear_token_logprobs vs the rule above; gradient atol scales with the reference's magnitude.

    Returns (logp, entropy, d_hidden, d_weight, d_bias, the raw result of the kernel call)."""
    kw = dict(temperature=temperature, ignore_index=ignore_index, grads=grads)
    g, ge = upstream(t.shape, h.device)
    out = run_linear(kernels.linear_token_logprobs, h, w, b, t, g, ge, with_ent, chunk_size=chunk_size, **kw)
    same = run_linear(eager_linear, h, w, b, t, g, ge, with_ent, **kw)
    b64 = b.to(F64) if b is not None else None
    ref = run_linear(ref_linear, h.to(F64), w.to(F64), b64, t, g.double(), ge.double(), with_ent, **kw)
    names = ("logp", "entropy", "d_hidden", "d_weight", "d_bias")
    for i, (name, o, s, r) in enumerate(zip(names, out[:5], same[:5], ref[:5], strict=True)):
        if o is None:
            assert s is None, name
            continue
        tol = atol if i < 2 else gatol * (1 + r.abs().max().item())
        assert_close(name, o, s, r, tol)
    keep = t != ignore_index
    assert (out[0][~keep] == 0).all()
    if out[2] is not None:
        assert (out[2][~keep] == 0).all()
    return out
