"""kernels.linear_token_logprobs on every backend (tests/kernels/conftest.py), judged by the rule in _compare.py.

Trainable head (hidden, weight, bias all need gradients) and frozen head (only hidden: the LoRA/GvU case, which
the C++ backend serves with its no-recompute backward, chosen by requires_grad alone).
"""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPES, F64, IGN, check_linear, err, targets

import kernels
from kernels import linear_token_logprobs_ref


def _inputs(N, D, V, dtype, device, w_scale=None, bias=False, b_scale=1.0):
    h = torch.randn(N, D).to(dtype).to(device)
    w = (torch.randn(V, D) * (w_scale if w_scale is not None else 2 / D**0.5)).to(dtype).to(device)
    b = (torch.randn(V) * b_scale).to(dtype).to(device) if bias else None
    return h, w, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_across_block_borders(backend, dtype, bias):
    # Interpreter tiles are 16 rows x 32 vocab x 32 D: 37 x 103 x 45 crosses every border, with 2 vocab splits.
    h, w, b = _inputs(37, 45, 103, dtype, backend.device, bias=bias, b_scale=1.0 if dtype == torch.float32 else 0.1)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    check_linear(h, w, b, targets((37,), 103, backend.device), temperature=0.8, atol=tol, gatol=tol)


@pytest.mark.parametrize("chunk_size", [1, 3, 6, 7, 50, None])
@pytest.mark.parametrize("bias", [False, True])
def test_chunk_borders(backend, chunk_size, bias):
    h, w, b = _inputs(7, 16, 1001, torch.float32, backend.device, w_scale=0.5, bias=bias)
    t = targets((7,), 1001, backend.device, ignore_every=0)
    t[2] = IGN
    lp, ent, dh, _, _, _ = check_linear(h, w, b, t, chunk_size=chunk_size, temperature=0.8)
    assert lp[2] == 0 and ent[2] == 0 and (dh[2] == 0).all()


@pytest.mark.parametrize(("N", "D", "V"), [(1, 16, 7), (16, 17, 1), (5, 33, 64)])
def test_small_shapes(backend, N, D, V):
    h, w, _ = _inputs(N, D, V, torch.float32, backend.device, w_scale=1.0)
    check_linear(h, w, None, targets((N,), V, backend.device), with_ent=N % 2 == 1)


def test_gpt2_vocab_and_all_ignored(backend):
    h, w, _ = _inputs(3, 32, 50257, torch.float32, backend.device, w_scale=0.3)
    b = torch.randn(50257).to(backend.device)
    check_linear(h, w, b, targets((3,), 50257, backend.device))
    hg = h.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    lp, ent = kernels.linear_token_logprobs(hg, wg, torch.full((3,), IGN, device=backend.device), return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (hg.grad == 0).all() and (wg.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_block_borders(backend, dtype):
    # The C++ backward tiles V in blocks of 8192: targets on both sides of each border, the last block partial.
    h, w, b = _inputs(6, 24, 20000, dtype, backend.device, w_scale=0.3, bias=True)
    t = torch.tensor([8191, 8192, 16383, 16384, 0, 19999], device=backend.device)
    check_linear(h, w, b, t, chunk_size=4, atol=1e-4, gatol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    h, w, b = _inputs(20, 64, 3000, dtype, backend.device, w_scale=0.2, bias=True, b_scale=0.1)
    t = targets((20,), 3000, backend.device, ignore_every=0)
    t[4] = IGN
    check_linear(h, w, b, t, chunk_size=6, atol=1e-4, gatol=1e-4)


@pytest.mark.backends("torch", "cpp")  # 2500 x 9000 x 16: minutes under the Triton interpreter
def test_bf16_many_rows_and_v_blocks(backend):
    # 2500 kept rows: the C++ dH partials go in 1024-row slices; V=9000 spans two V-blocks (8192 + 808).
    h, w, b = _inputs(2500, 16, 9000, torch.bfloat16, backend.device, w_scale=0.3, bias=True, b_scale=0.1)
    t = targets((2500,), 9000, backend.device, ignore_every=0)
    t[[5, 2400]] = IGN
    check_linear(h, w, b, t, temperature=0.9, atol=1e-4, gatol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, None])
def test_bf16_weight_grad_accumulates_in_fp32(backend, chunk_size):
    # 512 rows = 32 (Triton) row blocks, or with chunk_size 1 512 one-row C++ chunks, adding into the same dW rows;
    # with None the C++ op forms dW in one bf16-input GEMM over all rows (eager's rounding). Accumulated in bf16
    # these lose the per-token terms (Liger's reported precision issue).
    N, D, V = 512, 32, 40
    h = torch.randn(N, D).bfloat16()
    w = (torch.randn(V, D) * 0.2).bfloat16()
    t = targets((N,), V, ignore_every=7)
    g = torch.randn(N)
    wk = w.clone().to(backend.device).requires_grad_()
    lp = kernels.linear_token_logprobs(h.to(backend.device), wk, t.to(backend.device), chunk_size=chunk_size)
    (lp * g.to(backend.device)).sum().backward()
    w64 = w.double().requires_grad_()
    (linear_token_logprobs_ref(h.double(), w64, t, upcast_dtype=F64) * g.double()).sum().backward()
    rounding = err(w64.grad.to(torch.bfloat16), w64.grad)  # the best any bf16 dW can do
    assert wk.grad.dtype == torch.bfloat16
    assert err(wk.grad.cpu(), w64.grad) <= 2 * rounding + 1e-6
    # What a bf16 accumulator over 16-row blocks gives: clearly worse, so the check above has teeth.
    keep = t != IGN
    dz = torch.zeros(N, V, dtype=F64)
    dz[keep] = torch.nn.functional.one_hot(t[keep], V).double() - (h.double() @ w.double().T)[keep].softmax(-1)
    dz *= g.double()[:, None]
    acc = torch.zeros(V, D, dtype=torch.bfloat16)
    for i in range(0, N, 16):
        acc += (dz[i : i + 16].T @ h[i : i + 16].double()).to(torch.bfloat16)
    assert err(acc, w64.grad) > 2 * err(wk.grad.cpu(), w64.grad)


@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_gradients_only_when_required(backend, which):
    # LoRA-style: frozen weight (or frozen hidden); the kernel must skip the unneeded products.
    h, w, b = _inputs(9, 20, 50, torch.float32, backend.device, w_scale=0.3, bias=True)
    lp, ent, dh, dw, db, _ = check_linear(h, w, b, targets((9,), 50, backend.device), grads=(which,))
    got = {"hidden": dh, "weight": dw, "bias": db}
    assert all((v is not None) == (k == which) for k, v in got.items())


def test_leading_dims_chunk_size_and_mixed_dtypes(backend):
    B, L, D, V = 2, 5, 24, 70
    h = torch.randn(B, L, D).to(backend.device)
    w = (torch.randn(V, D) * 0.3).to(torch.bfloat16).to(backend.device)
    t = targets((B, L), V, backend.device)
    a = kernels.linear_token_logprobs(h, w, t, chunk_size=3)
    c = kernels.linear_token_logprobs(h, w, t)
    assert a.shape == (B, L)
    if backend.name == "triton":
        assert torch.equal(a, c)  # chunk_size is ignored by the tiled Triton path
    ref = linear_token_logprobs_ref(h.reshape(-1, D).double(), w.double(), t.reshape(-1), upcast_dtype=F64)
    # C++ computes a mixed pair in the weight's dtype (bf16 logits), Triton and torch in the wider one.
    tol = 0.05 if backend.name == "cpp" else 1e-5
    assert err(a.reshape(-1), ref) < tol and err(c.reshape(-1), ref) < tol


def test_empty_and_all_ignored(backend):
    h = torch.randn(0, 8, device=backend.device, requires_grad=True)
    w = torch.randn(5, 8, device=backend.device, requires_grad=True)
    logp, ent = kernels.linear_token_logprobs(h, w, torch.zeros(0, dtype=torch.long, device=backend.device),
                                              return_entropy=True)  # fmt: skip
    assert logp.shape == ent.shape == (0,)
    h = torch.randn(4, 8, device=backend.device, requires_grad=True)
    logp = kernels.linear_token_logprobs(h, w, torch.full((4,), IGN, device=backend.device))
    logp.sum().backward()
    assert (logp == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


# ------------------------------------------------------------------------------------------- frozen head


def _graph_names(t: torch.Tensor) -> list[str]:
    """grad_fn names from t back along first inputs (kernels.ops adds a reshape on top of the op's node)."""
    names, fn = [], t.grad_fn
    while fn is not None:
        names.append(fn.name())
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return names


@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_head_matches_reference(backend, dtype, entropy, chunk_size):
    # Low precision: logits of a few units. At |z| ~ 10 the fp16 GEMM's own rounding of the logits (addmm rounds
    # once, eager's h @ W.T + b twice) decides the forward error by luck of the draw (0.0053 vs eager's 0.0016).
    if backend.name == "triton" and chunk_size is not None:
        pytest.skip("chunk_size is ignored by the Triton tiles: the chunk_size=None case covers it")
    sw, sb = (0.5, 1.0) if dtype == torch.float32 else (0.2, 0.1)
    h, w, b = _inputs(7, 16, 1001, dtype, backend.device, w_scale=sw, bias=True, b_scale=sb)
    t = targets((7,), 1001, backend.device, ignore_every=0)
    t[[2, 6]] = IGN  # 6: the last row, so the last chunk may hold only ignored rows
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    lp, _, dh, dw, db, res = check_linear(h, w, b, t, with_ent=entropy, chunk_size=chunk_size, temperature=0.8,
                                          grads=("hidden",), atol=tol, gatol=tol)  # fmt: skip
    assert dw is None and db is None
    assert lp[2] == lp[6] == 0 and (dh[2] == 0).all() and (dh[6] == 0).all()
    if backend.name == "cpp":  # the frozen head takes the no-recompute forward
        names = _graph_names(res[0] if entropy else res)
        assert any("linear_token_logprobs_frozen" in n for n in names), names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_gpt2_vocab_confident_rows(backend, dtype):
    # Rows with p(target) ~ 1: dH ~ W[t] - E is a small difference of large rows (the cancellation case).
    h, w, _ = _inputs(6, 24, 50257, dtype, "cpu", w_scale=0.3)
    t = targets((6,), 50257, ignore_every=0)
    h[:3] = (w[t[:3]].float() * 4).to(dtype)
    h, w, t = h.to(backend.device), w.to(backend.device), t.to(backend.device)
    check_linear(h, w, None, t, chunk_size=4, temperature=1.3, grads=("hidden",), atol=1e-4, gatol=1e-4)


def test_frozen_head_all_ignored_and_mixed_dtypes(backend):
    h, w = torch.randn(3, 32, device=backend.device, requires_grad=True), torch.randn(500, 32, device=backend.device)
    lp, ent = kernels.linear_token_logprobs(h, w, torch.full((3,), IGN, device=backend.device), return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (h.grad == 0).all()
    # fp32 hidden with a bf16 head: the gradient comes back in hidden's dtype.
    h, w, t = torch.randn(5, 32), (torch.randn(500, 32) * 0.2).bfloat16(), targets((5,), 500)
    hg = h.clone().to(backend.device).requires_grad_()
    lp, ent = kernels.linear_token_logprobs(hg, w.to(backend.device), t.to(backend.device), return_entropy=True,
                                            chunk_size=2)  # fmt: skip
    (lp.sum() + ent.sum()).backward()
    h64 = h.double().requires_grad_()
    lp64, ent64 = linear_token_logprobs_ref(h64, w.double(), t, return_entropy=True, upcast_dtype=F64)
    (lp64.sum() + ent64.sum()).backward()
    assert hg.grad.dtype == torch.float32
    # C++ runs in the weight's dtype: bf16 logits, ~2^-8 relative error on |z| of a few units.
    torch.testing.assert_close(lp.double().cpu(), lp64.detach().double(), atol=0.05, rtol=0)
    torch.testing.assert_close(hg.grad.double().cpu(), h64.grad, atol=0.02, rtol=0.02)


def test_rejects_bad_inputs(backend):
    h, w = torch.randn(4, 8, device=backend.device), torch.randn(30, 8, device=backend.device)
    t = targets((4,), 30, backend.device)
    lin = kernels.linear_token_logprobs
    with pytest.raises(TypeError, match="weight must be fp32"):
        lin(h, w.long(), t)
    with pytest.raises(ValueError, match="same D"):
        lin(h, w[:, :7], t)
    with pytest.raises(ValueError, match="leading shape"):
        lin(h, w, t[:3])
    with pytest.raises(ValueError, match=r"bias must be \(V,\)"):
        lin(h, w, t, bias=torch.zeros(29, device=backend.device))
    with pytest.raises(ValueError, match="chunk_size"):
        lin(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        lin(h, w, t, temperature=-1.0)
    if backend.device == "cpu":
        with pytest.raises(IndexError, match=r"\[0, 30\)"):
            lin(h, w, torch.tensor([0, 1, 2, 30]))
