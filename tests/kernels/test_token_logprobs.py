"""kernels.token_logprobs on every backend (tests/kernels/conftest.py), judged by the rule in _compare.py."""

from __future__ import annotations

import pytest
import torch
from _compare import DTYPES, F64, IGN, check_token, err, logits, targets

import kernels
from kernels import token_logprobs_ref


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("N", "V"), [(1, 1), (3, 7), (3, 1000), (7, 5003), (5, 50257), (2, 151936)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, dtype, N, V, temperature):
    # V = 50257 and 151936: the last 4096-wide (Triton) / SIMD block is partly padding, which must count as -inf.
    x, t = logits((N, V), dtype, backend.device), targets((N,), V, backend.device)
    logp, _, _ = check_token(x, t, temperature=temperature)
    assert (logp <= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_vocab_hot_temperature(backend, dtype):
    logp, _, _ = check_token(logits((2, 50257), dtype, backend.device), targets((2,), 50257, backend.device, 5),
                             temperature=1.3)  # fmt: skip
    assert (logp <= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_rows(backend, dtype):
    # 129 rows x 1000: the C++ row-parallel path (the cases above are few rows, split along V).
    check_token(logits((129, 1000), dtype, backend.device), targets((129,), 1000, backend.device, 64), temperature=1.3)


@pytest.mark.parametrize("with_ent", [False, True])
def test_entropy_optional(backend, with_ent):
    check_token(logits((6, 300), torch.float32, backend.device), targets((6,), 300, backend.device), with_ent=with_ent,
                temperature=2.0)  # fmt: skip


def test_entropy_only_gradient(backend):
    x = logits((4, 33), torch.float32, backend.device).requires_grad_()
    t = targets((4,), 33, backend.device)
    _, ent = kernels.token_logprobs(x, t, return_entropy=True, temperature=0.9)
    (grad,) = torch.autograd.grad(ent.sum(), x)
    x64 = x.detach().double().requires_grad_()
    _, ent64 = token_logprobs_ref(x64, t, return_entropy=True, temperature=0.9, upcast_dtype=F64)
    (grad64,) = torch.autograd.grad(ent64.sum(), x64)
    assert err(grad, grad64) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_neg_inf_except_a_few(backend, dtype):
    # Masked vocabularies: every logit -inf except the target, or a few allowed tokens.
    v = 40000
    x = torch.full((4, v), float("-inf"), dtype=dtype)
    t = torch.tensor([5, v - 1, 123, 10])
    x[0, 5] = 2.0
    x[1, v - 1] = -3.0
    x[2, :100] = torch.randn(100).to(dtype)  # a few finite logits, the rest -inf
    x[2, 123] = 1.0
    x[3, 10] = x[3, 40] = 0.0
    x, t = x.to(backend.device), t.to(backend.device)
    xg = x.clone().requires_grad_()
    lp, ent = kernels.token_logprobs(xg, t, temperature=0.5, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert lp[:2].tolist() == [0.0, 0.0] and ent[:2].tolist() == [0.0, 0.0]
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert torch.isfinite(xg.grad).all() and (xg.grad[:2] == 0).all() and (xg.grad[x.isinf()] == 0).all()
    ref_lp, ref_ent = token_logprobs_ref(x, t, temperature=0.5, return_entropy=True, upcast_dtype=F64)
    torch.testing.assert_close(lp, ref_lp.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits(backend, dtype):
    x = logits((5, 129), dtype, scale=1.0)
    x[:, ::2] = 1e4
    x[:, 1::3] = -1e4
    x[2] = torch.linspace(-1e4, 1e4, 129).to(dtype)
    # |z| = 2e4: every backend saves (m, log s) and forms p = exp((z - m) - log s); exp(z - lse) from an fp32 lse
    # (the C++ op before) put up to 1e-3 relative error into p there (9e-5 absolute in fp32 gradients).
    check_token(x.to(backend.device), targets((5,), 129, backend.device), temperature=0.5, gatol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_wide_rows(backend, dtype):
    big = 6e4 if dtype == torch.float16 else 1e4  # fp16 tops out at 65504
    x = torch.randn(4, 3000).sign().to(dtype) * big
    x[:, 7] = big
    check_token(x.to(backend.device), targets((4,), 3000, backend.device), atol=1e-3)


def test_custom_ignore_index_and_all_ignored(backend):
    t = targets((5,), 40, backend.device, ignore_every=2, ignore_index=7)
    check_token(logits((5, 40), torch.float32, backend.device), t, ignore_index=7)
    x = logits((3, 40), torch.bfloat16, backend.device).requires_grad_()
    t = torch.full((3,), IGN, device=backend.device)
    logp, ent = kernels.token_logprobs(x, t, return_entropy=True)
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    assert (logp == 0).all() and (ent == 0).all() and (grad == 0).all() and grad.dtype == torch.bfloat16


@pytest.mark.parametrize(("width", "V", "lead"), [(80, 61, (2, 3)), (1010, 1000, (6,)), (5000, 5000, (2, 3))])
def test_leading_dims_and_strided_rows(backend, width, V, lead):
    # Rows taken from a wider buffer (row stride != V) go through without a copy; leading dims are flattened.
    x = logits((*lead, width), torch.float32, backend.device)[..., :V]
    assert x.stride(-1) == 1
    logp, ent, _ = check_token(x, targets(lead, V, backend.device), temperature=1.5)
    assert logp.shape == ent.shape == lead


@pytest.mark.parametrize("shape", [(0, 9), (2, 0, 9), (0, 50257)])
def test_empty(backend, shape):
    x = torch.randn(shape, device=backend.device, requires_grad=True)
    t = torch.zeros(shape[:-1], dtype=torch.long, device=backend.device)
    logp, ent = kernels.token_logprobs(x, t, return_entropy=True)
    assert logp.shape == ent.shape == shape[:-1]
    (logp.sum() + ent.sum()).backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_writes_a_new_tensor_and_no_grad_path(backend, dtype):
    x = logits((8, 3000), dtype, backend.device)
    before = x.clone()
    t = targets((8,), 3000, backend.device)
    xr = x.requires_grad_()
    logp = kernels.token_logprobs(xr, t)
    (grad,) = torch.autograd.grad((logp * torch.randn(8, device=backend.device)).sum(), xr)
    assert grad.data_ptr() != x.data_ptr() and torch.equal(x.detach(), before)
    with torch.no_grad():  # reference / old log-probs: forward only
        again = kernels.token_logprobs(x, t)
    assert torch.equal(again, logp.detach())


def test_backend_function_contract(backend):
    # Backends take validated rows and return (logp, entropy or None); kernels.ops relies on it.
    fn = token_logprobs_ref if backend.name == "torch" else backend.impl("token_logprobs")
    x = logits((4, 20), torch.float16, backend.device)
    res = fn(x, targets((4,), 20, backend.device), temperature=1.0, ignore_index=IGN, return_entropy=False)
    logp, ent = (res, None) if backend.name == "torch" else res
    assert logp.dtype == torch.float32 and logp.shape == (4,) and ent is None


def test_rejects_bad_inputs(backend):
    # One validation layer (kernels.ops) for every backend: the same errors whichever runs.
    x, t = logits((3, 10), torch.float32, backend.device), targets((3,), 10, backend.device)
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        kernels.token_logprobs(x.long(), t)
    with pytest.raises(TypeError, match="integer"):
        kernels.token_logprobs(x, t.float())
    with pytest.raises(ValueError, match="same leading shape"):
        kernels.token_logprobs(x, t[:2])
    with pytest.raises(ValueError, match="temperature"):
        kernels.token_logprobs(x, t, temperature=0.0)
    if backend.device == "cpu":  # no host sync on GPU: out-of-range targets are only caught on CPU
        with pytest.raises(IndexError, match=r"\[0, 10\)"):
            kernels.token_logprobs(x, torch.tensor([0, 10, 3]))
        with pytest.raises(IndexError):
            kernels.token_logprobs(x, torch.tensor([0, -1, 3]))
        assert kernels.token_logprobs(x, torch.tensor([0, IGN, 9])).shape == (3,)
