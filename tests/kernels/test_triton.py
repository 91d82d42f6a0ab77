"""Triton backend vs the PyTorch references, through the public `kernels` API with the backend forced.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay
small. Accuracy is judged flash-attention style against the fp64 reference:
err(triton) <= 2 * err(PyTorch on the same inputs and dtype) + atol, errors as max abs differences.
"""

from __future__ import annotations

import os

import pytest
import torch

import kernels
from kernels import group_advantages_ref, linear_token_logprobs_ref, token_logprobs_ref

pytest.importorskip("triton")

CUDA = os.environ.get("GVU_TEST_CUDA", "0") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1", reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Absolute slack on top of 2x PyTorch's own error, per dtype of the compared tensor.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


@pytest.fixture(autouse=True)
def triton_backend():
    with kernels.use_backend("triton"):
        assert kernels.choose(torch.device(DEVICE)) == "triton"
        yield


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(out, base, ref64, atol, what=""):
    """out: kernel result, base: PyTorch on the same inputs, ref64: fp64 reference."""
    assert out.shape == base.shape == ref64.shape and out.dtype == base.dtype, (what, out.dtype, base.dtype)
    assert torch.isfinite(out).all() == torch.isfinite(ref64).all(), what
    e, e_base = _err(out, ref64), _err(base, ref64)
    assert e <= 2 * e_base + atol, f"{what}: err {e:.3g} > 2 * torch err {e_base:.3g} + {atol:g}"


def _logits(shape, dtype, scale=3.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def _targets(shape, V, ignore_every=3, ignore_index=-100):
    t = torch.randint(0, V, shape, device=DEVICE)
    flat = t.view(-1)
    flat[1::ignore_every] = ignore_index  # some ignored positions in every test with N > 1
    return t


def _run_token(logits, targets, with_ent, fn, g, ge, **kw):
    """(logp, ent, grad) of fn with upstream grads g (logp) and ge (entropy)."""
    x = logits.detach().requires_grad_()
    res = fn(x, targets, return_entropy=with_ent, **kw)
    logp, ent = res if with_ent else (res, None)
    loss = (logp * g).sum() + ((ent * ge).sum() if with_ent else 0)
    (grad,) = torch.autograd.grad(loss, x)
    return logp.detach(), (ent.detach() if with_ent else None), grad


def check_token(logits, targets, *, with_ent=True, temperature=1.0, ignore_index=-100, atol_scale=1.0):
    """Kernel vs torch-in-dtype vs fp64 reference: logp, entropy and grad w.r.t. logits."""
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    g = torch.randn(targets.shape, device=DEVICE)
    ge = torch.randn(targets.shape, device=DEVICE)
    out = _run_token(logits, targets, with_ent, kernels.token_logprobs, g, ge, **kw)
    base = _run_token(logits, targets, with_ent, token_logprobs_ref, g, ge, **kw)
    ref = _run_token(
        logits.to(F64), targets, with_ent, token_logprobs_ref, g.double(), ge.double(), upcast_dtype=F64, **kw
    )
    assert_close(out[0], base[0], ref[0], ATOL[torch.float32] * atol_scale, "logp")
    if with_ent:
        assert_close(out[1], base[1], ref[1], ATOL[torch.float32] * atol_scale, "entropy")
    assert_close(out[2], base[2], ref[2], ATOL[logits.dtype] * atol_scale, "grad")
    keep = targets != ignore_index
    assert (out[0][~keep] == 0).all() and (out[2][~keep] == 0).all()
    return out


# ------------------------------------------------------------------------------------------ token_logprobs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("N", "V"), [(1, 1), (5, 7), (3, 1000), (7, 5003)])
def test_token_logprobs_matches_reference(dtype, N, V):
    check_token(_logits((N, V), dtype), _targets((N,), V), temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_gpt2_vocab(dtype):
    # V = 50257 is odd: the last 4096-wide block is partly padding, which must count as -inf (logp <= 0).
    logp, _, _ = check_token(_logits((2, 50257), dtype), _targets((2,), 50257, ignore_every=5), temperature=1.3)
    assert (logp <= 0).all()


@pytest.mark.parametrize("with_ent", [False, True])
def test_token_logprobs_entropy_optional(with_ent):
    check_token(_logits((6, 300), torch.float32), _targets((6,), 300), with_ent=with_ent, temperature=2.0)


def test_token_logprobs_entropy_only_gradient():
    x = _logits((4, 33), torch.float32).requires_grad_()
    t = _targets((4,), 33)
    _, ent = kernels.token_logprobs(x, t, return_entropy=True, temperature=0.9)
    (grad,) = torch.autograd.grad(ent.sum(), x)
    x64 = x.detach().double().requires_grad_()
    _, ent64 = token_logprobs_ref(x64, t, return_entropy=True, temperature=0.9, upcast_dtype=F64)
    (grad64,) = torch.autograd.grad(ent64.sum(), x64)
    assert _err(grad, grad64) < 1e-5


def test_token_logprobs_rows_of_neg_inf():
    # Masked vocabularies: every logit -inf except the target (or a few allowed tokens).
    x = torch.full((4, 70), -float("inf"), device=DEVICE)
    t = torch.tensor([3, 69, 0, 10], device=DEVICE)
    x[0, 3] = 5.0
    x[1, 69] = -2.0
    x[2, :2] = torch.tensor([1.0, 2.0])
    x[3, 10] = 0.0
    x[3, 40] = 0.0
    x.requires_grad_()
    logp, ent = kernels.token_logprobs(x, t, return_entropy=True)
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    ref_logp, ref_ent = token_logprobs_ref(x.detach().double(), t, return_entropy=True, upcast_dtype=F64)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert logp[0] == 0 and ent[0] == 0 and logp[1] == 0 and ent[1] == 0
    assert _err(logp, ref_logp) < 1e-6 and _err(ent, ref_ent) < 1e-6
    assert (grad[:2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_large_logits(dtype):
    x = _logits((5, 129), dtype, scale=1.0)
    x[:, ::2] = 1e4
    x[:, 1::3] = -1e4
    x[2] = torch.linspace(-1e4, 1e4, 129).to(dtype)
    check_token(x, _targets((5,), 129), temperature=0.5)


def test_token_logprobs_custom_ignore_index_and_all_ignored():
    check_token(_logits((5, 40), torch.float32), _targets((5,), 40, ignore_every=2, ignore_index=7), ignore_index=7)
    x = _logits((3, 40), torch.bfloat16).requires_grad_()
    t = torch.full((3,), -100, device=DEVICE)
    logp, ent = kernels.token_logprobs(x, t, return_entropy=True)
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    assert (logp == 0).all() and (ent == 0).all() and (grad == 0).all() and grad.dtype == torch.bfloat16


def test_token_logprobs_leading_dims_and_strided_rows():
    # (B, L, V) taken from a wider buffer: rows have stride 80 != V, exercised without a copy.
    buf = _logits((2, 3, 80), torch.float32)
    x = buf[..., :61]
    assert x.stride(-1) == 1 and x.stride(1) == 80
    check_token(x, _targets((2, 3), 61), temperature=1.5)


@pytest.mark.parametrize("shape", [(0, 9), (2, 0, 9)])
def test_token_logprobs_empty(shape):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    logp, ent = kernels.token_logprobs(x, torch.zeros(shape[:-1], dtype=torch.long, device=DEVICE), return_entropy=True)
    assert logp.shape == ent.shape == shape[:-1]
    (logp.sum() + ent.sum()).backward()
    assert x.grad.shape == shape


def test_token_logprobs_backward_writes_a_new_tensor_and_no_grad_path():
    x = _logits((3, 50), torch.bfloat16)
    before = x.clone()
    t = _targets((3,), 50)
    xr = x.requires_grad_()
    logp = kernels.token_logprobs(xr, t)
    (grad,) = torch.autograd.grad(logp.sum(), xr)
    assert grad.data_ptr() != x.data_ptr() and torch.equal(x.detach(), before)
    with torch.no_grad():  # reference / old log-probs: forward only
        again = kernels.token_logprobs(x, t)
    assert torch.equal(again, logp.detach())


def test_token_logprobs_direct_backend_call_contract():
    from kernels.triton_ops.token_logprobs import token_logprobs_triton

    x = _logits((4, 20), torch.float16)
    logp, ent = token_logprobs_triton(x, _targets((4,), 20), temperature=1.0, ignore_index=-100, return_entropy=False)
    assert logp.dtype == torch.float32 and logp.shape == (4,) and ent is None


@pytest.mark.cuda
@pytest.mark.slow
def test_token_logprobs_int64_offsets_cuda():
    # N * V > 2^31 elements: row * stride overflows int32 (about 4.7 GB of bf16).
    N, V = 15000, 151936
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda")
    logp = kernels.token_logprobs(x, t)
    rows = torch.tensor([0, N // 2, N - 1], device="cuda")
    ref = token_logprobs_ref(x[rows], t[rows], upcast_dtype=F64)
    assert _err(logp[rows], ref) < 1e-4


# ------------------------------------------------------------------------------------ linear_token_logprobs


def _run_linear(h, w, b, t, with_ent, fn, g, ge, **kw):
    leaves = [x.detach().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    res = fn(leaves[0], leaves[1], t, bias=leaves[2] if b is not None else None, return_entropy=with_ent, **kw)
    logp, ent = res if with_ent else (res, None)
    loss = (logp * g).sum() + ((ent * ge).sum() if with_ent else 0)
    grads = torch.autograd.grad(loss, leaves)
    return (logp.detach(), ent.detach() if with_ent else None, *grads)


def check_linear(h, w, b, t, *, with_ent=True, temperature=1.0, ignore_index=-100, chunk_size=None):
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    g = torch.randn(t.shape, device=DEVICE)
    ge = torch.randn(t.shape, device=DEVICE)
    out = _run_linear(h, w, b, t, with_ent, kernels.linear_token_logprobs, g, ge, chunk_size=chunk_size, **kw)
    base = _run_linear(h, w, b, t, with_ent, linear_token_logprobs_ref, g, ge, **kw)
    b64 = b.to(F64) if b is not None else None
    ref = _run_linear(h.to(F64), w.to(F64), b64, t, with_ent, linear_token_logprobs_ref, g.double(), ge.double(),
                      upcast_dtype=F64, **kw)  # fmt: skip
    names = ["logp", "entropy", "d_hidden", "d_weight", "d_bias"]
    for i, (o, bs, r) in enumerate(zip(out, base, ref, strict=True)):
        if o is None:
            continue
        dtype = torch.float32 if i < 2 else bs.dtype
        assert_close(o, bs, r, ATOL[dtype] * (1 + r.abs().max().item()), names[i])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference_across_block_borders(dtype, bias):
    # Interpreter tiles are 16 rows x 32 vocab x 32 D: 37 x 103 x 45 crosses every border, with 2 vocab splits.
    N, D, V = 37, 45, 103
    h = torch.randn(N, D, device=DEVICE).to(dtype)
    w = (torch.randn(V, D, device=DEVICE) / D**0.5 * 2).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    check_linear(h, w, b, _targets((N,), V), temperature=0.8)


@pytest.mark.parametrize(("N", "D", "V"), [(1, 16, 7), (16, 17, 1), (5, 33, 64)])
def test_linear_small_shapes(N, D, V):
    h, w = torch.randn(N, D, device=DEVICE), torch.randn(V, D, device=DEVICE)
    check_linear(h, w, None, _targets((N,), V), with_ent=N % 2 == 1)


def test_linear_fp32_dw_accumulation_with_bf16_weight():
    # 512 rows = 32 row blocks adding into the same dW rows: accumulated in bf16 this loses the per-token terms.
    N, D, V = 512, 32, 40
    h = torch.randn(N, D, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(V, D, device=DEVICE) * 0.2).to(torch.bfloat16)
    t = _targets((N,), V, ignore_every=7)
    g = torch.randn(N, device=DEVICE)
    wk = w.clone().requires_grad_()
    (kernels.linear_token_logprobs(h, wk, t) * g).sum().backward()
    w64 = w.double().requires_grad_()
    (linear_token_logprobs_ref(h.double(), w64, t, upcast_dtype=F64) * g.double()).sum().backward()
    rounding = _err(w64.grad.to(torch.bfloat16), w64.grad)  # the best any bf16 dW can do
    assert wk.grad.dtype == torch.bfloat16
    assert _err(wk.grad, w64.grad) <= 2 * rounding + 1e-6
    # What a bf16 accumulator over the 10 row blocks would give: clearly worse, so the check above has teeth.
    logits = h.double() @ w.double().T
    dz = torch.zeros_like(logits)
    keep = t != -100
    p = logits.softmax(-1)
    dz[keep] = (torch.nn.functional.one_hot(t[keep], V).double() - p[keep]) * g.double()[keep, None]
    acc = torch.zeros(V, D, dtype=torch.bfloat16)
    for i in range(0, N, 16):
        acc += (dz[i : i + 16].T @ h[i : i + 16].double()).to(torch.bfloat16)
    assert _err(acc, w64.grad) > 2 * _err(wk.grad, w64.grad)


@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_linear_gradients_only_when_required(which):
    # LoRA-style: frozen weight (or frozen hidden); the kernel must skip the unneeded products.
    N, D, V = 9, 20, 50
    h, w, b = torch.randn(N, D), torch.randn(V, D) * 0.3, torch.randn(V)
    h, w, b = (
        x.to(DEVICE).requires_grad_(name == which)
        for x, name in zip((h, w, b), ("hidden", "weight", "bias"), strict=True)
    )
    t = _targets((N,), V)
    logp = kernels.linear_token_logprobs(h, w, t, bias=b)
    logp.sum().backward()
    ref = {n: x.detach().double().requires_grad_() for n, x in (("hidden", h), ("weight", w), ("bias", b))}
    linear_token_logprobs_ref(ref["hidden"], ref["weight"], t, bias=ref["bias"], upcast_dtype=F64).sum().backward()
    for name, x in (("hidden", h), ("weight", w), ("bias", b)):
        assert (x.grad is not None) == (name == which)
    grad = {"hidden": h, "weight": w, "bias": b}[which].grad
    assert _err(grad, ref[which].grad) < 1e-5


def test_linear_leading_dims_chunk_size_and_mixed_dtypes():
    B, L, D, V = 2, 5, 24, 70
    h = torch.randn(B, L, D, device=DEVICE)
    w = (torch.randn(V, D, device=DEVICE) * 0.3).to(torch.bfloat16)
    t = _targets((B, L), V)
    a = kernels.linear_token_logprobs(h, w, t, chunk_size=3)
    c = kernels.linear_token_logprobs(h, w, t)
    assert a.shape == (B, L) and torch.equal(a, c)  # chunk_size is ignored by the tiled Triton path
    ref = linear_token_logprobs_ref(h.reshape(-1, D).double(), w.double(), t.reshape(-1), upcast_dtype=F64)
    assert _err(a.reshape(-1), ref) < 1e-5


def test_linear_empty_and_all_ignored():
    h = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=DEVICE)
    logp, ent = kernels.linear_token_logprobs(h, w, t, return_entropy=True)
    assert logp.shape == ent.shape == (0,)
    h = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    logp = kernels.linear_token_logprobs(h, w, torch.full((4,), -100, device=DEVICE))
    logp.sum().backward()
    assert (logp == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


# ---------------------------------------------------------------------------------------- group_advantages


def _rewards(M, G, dtype=torch.float32):
    r = torch.randn(M, device=DEVICE, dtype=torch.float64)
    if M >= 2 * G and G > 1:
        r[:G] = 0.5  # a zero-spread group
    r[1::5] = float("nan")
    if G > 2:
        r[G + 2 : 2 * G] = float("nan")  # a group with fewer than two valid rewards when G == 3
    return r.to(dtype)


@pytest.mark.parametrize("G", [1, 2, 3, 8])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_matches_reference(G, scale, unbiased):
    r = _rewards(8 * G, G)
    out = kernels.group_advantages(r, G, scale=scale, unbiased=unbiased, eps=1e-4)
    ref = group_advantages_ref(r, G, scale=scale, unbiased=unbiased, eps=1e-4)
    assert out.dtype == torch.float32 and out.shape == r.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    if G == 1:
        assert (out == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_group_advantages_dtypes_large_group_and_edge_cases(dtype):
    r = _rewards(2 * 1500, 1500, dtype)  # groups wider than one 1024-wide block
    torch.testing.assert_close(kernels.group_advantages(r, 1500), group_advantages_ref(r, 1500), rtol=1e-6, atol=1e-6)
    nan = torch.full((8,), float("nan"), device=DEVICE, dtype=dtype)
    for scale in ("group", "batch", "none"):
        assert (kernels.group_advantages(nan, 4, scale=scale) == 0).all()
    assert kernels.group_advantages(torch.zeros(0, device=DEVICE), 4).shape == (0,)
