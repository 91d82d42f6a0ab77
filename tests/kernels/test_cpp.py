"""C++ CPU ops (kernels/csrc) against the fp64 references, forward and backward; skipped when not built.

Tolerance (flash-attention's rule): err(cpp) <= 2 * err(torch in the same dtype) + atol, both measured against the
reference in fp64 on the same (already rounded) inputs. "torch in the same dtype" is the reference run the way
eager PyTorch would: fp32 maths on the low-precision logits, gradient returned in the logits' dtype.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kernels
from kernels import cpp_ops
from kernels.reference import group_advantages_ref, linear_token_logprobs_ref, token_logprobs_ref

pytestmark = pytest.mark.skipif(not cpp_ops.available(), reason=f"C++ ops not built: {cpp_ops.load_error()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGN = -100


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _assert_close(name, out, ref64, same_dtype, atol):
    e, e_t = _err(out, ref64), _err(same_dtype, ref64)
    assert e <= 2 * e_t + atol, f"{name}: err {e:.3g} > 2 * torch's {e_t:.3g} + {atol:g}"


def _logits(n, v, dtype, scale=3.0):
    return (torch.randn(n, v) * scale).to(dtype)


def _targets(n, v, ignore_rows=()):
    t = torch.randint(0, v, (n,))
    for r in ignore_rows:
        t[r] = IGN
    return t


def _token_run(fn, x, t, w_lp, w_ent, **kw):
    """(logp, entropy, grad of sum(w_lp * logp + w_ent * entropy) w.r.t. x)."""
    x = x.detach().clone().requires_grad_()
    lp, ent = fn(x, t, **kw)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


def _cpp(x, t, **kw):
    return cpp_ops.token_logprobs_cpp(x, t, return_entropy=True, **kw)


def _ref(upcast):
    def fn(x, t, **kw):
        return token_logprobs_ref(x, t, return_entropy=True, upcast_dtype=upcast, **kw)

    return fn


def _check_token(x, t, temperature=1.0, atol=1e-5, gatol=1e-6):
    w_lp, w_ent = torch.randn(x.shape[0]), torch.randn(x.shape[0])
    kw = dict(temperature=temperature, ignore_index=IGN)
    lp, ent, g = _token_run(_cpp, x, t, w_lp, w_ent, **kw)
    lp64, ent64, g64 = _token_run(_ref(torch.float64), x.double(), t, w_lp.double(), w_ent.double(), **kw)
    lpt, entt, gt = _token_run(_ref(torch.float32), x, t, w_lp, w_ent, **kw)
    assert lp.dtype == ent.dtype == torch.float32 and g.dtype == x.dtype and g.shape == x.shape
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(g).all()
    _assert_close("logp", lp, lp64, lpt, atol)
    _assert_close("entropy", ent, ent64, entt, atol)
    _assert_close("grad", g, g64, gt, gatol)
    return lp, ent, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "v"), [(1, 1), (3, 7), (5, 50257), (2, 151936)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_reference(dtype, n, v, temperature):
    t = _targets(n, v, ignore_rows=(1,) if n > 2 else ())
    lp, ent, g = _check_token(_logits(n, v, dtype), t, temperature=temperature)
    if n > 2:  # the ignored row: zero output, zero gradient
        assert lp[1] == 0 and ent[1] == 0 and (g[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_n_many_rows(dtype):
    # 129 rows x 1000: the row-parallel path (the cases above are few rows, split along V).
    _check_token(_logits(129, 1000, dtype), _targets(129, 1000, ignore_rows=(0, 64, 128)), temperature=1.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_neg_inf_except_target(dtype):
    v = 40000
    x = torch.full((3, v), float("-inf"), dtype=dtype)
    t = torch.tensor([5, v - 1, 123])
    x[0, 5] = 2.0
    x[1, v - 1] = -3.0
    x[2, :100] = torch.randn(100).to(dtype)  # a few finite logits, the rest -inf
    x[2, 123] = 1.0
    xg = x.clone().requires_grad_()
    lp, ent = cpp_ops.token_logprobs_cpp(xg, t, temperature=0.5, ignore_index=IGN, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert lp[:2].tolist() == [0.0, 0.0] and ent[:2].tolist() == [0.0, 0.0]
    assert torch.isfinite(xg.grad).all() and (xg.grad[:2] == 0).all() and (xg.grad[x.isinf()] == 0).all()
    ref_lp, ref_ent = token_logprobs_ref(x, t, temperature=0.5, return_entropy=True, upcast_dtype=torch.float64)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits(dtype):
    big = 6e4 if dtype == torch.float16 else 1e4  # fp16 tops out at 65504
    x = torch.randn(4, 3000).sign().to(dtype) * big
    x[:, 7] = big
    _check_token(x, _targets(4, 3000), atol=1e-3)


def test_strided_rows_and_leading_dims():
    wide = torch.randn(6, 1010)
    x = wide[:, :1000]  # row stride 1010, unit column stride: no copy
    t = _targets(6, 1000)
    _check_token(x, t)
    x3 = torch.randn(2, 3, 5000, requires_grad=True)
    t3 = torch.randint(0, 5000, (2, 3))
    t3[1, 2] = IGN
    with kernels.use_backend("cpp"):
        lp, ent = kernels.token_logprobs(x3, t3, temperature=0.9, return_entropy=True)
    ref_lp, ref_ent = token_logprobs_ref(x3, t3, temperature=0.9, return_entropy=True)
    assert lp.shape == ent.shape == (2, 3)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)


def test_empty_batch():
    x = torch.randn(0, 50257, requires_grad=True)
    lp, ent = cpp_ops.token_logprobs_cpp(x, torch.zeros(0, dtype=torch.long), temperature=1.0, ignore_index=IGN,
                                         return_entropy=True)  # fmt: skip
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 50257)


def test_lse_output_and_its_gradient():
    x = torch.randn(4, 777, dtype=torch.float64).float().requires_grad_()
    t = _targets(4, 777)
    _, lse, _ = torch.ops.gvu_kernels.token_logprobs(x, t, 0.8, IGN, False)
    torch.testing.assert_close(lse, torch.logsumexp(x.detach() / 0.8, -1))
    w = torch.randn(4)
    (lse * w).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (torch.logsumexp(xr / 0.8, -1) * w).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-7, rtol=1e-5)


def test_bad_target_raises():
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.gvu_kernels.token_logprobs(torch.randn(2, 10), torch.tensor([3, 10]), 1.0, IGN, False)


def test_backward_does_not_touch_inputs():
    x = torch.randn(8, 3000, requires_grad=True)
    before = x.detach().clone()
    g_up = torch.randn(8)
    lp, _ = cpp_ops.token_logprobs_cpp(x, _targets(8, 3000), temperature=1.0, ignore_index=IGN, return_entropy=False)
    lp.backward(g_up)
    assert torch.equal(x.detach(), before)


def _max_alloc(fn) -> int:
    """Largest single tensor allocation while fn runs (torch.profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_forward_allocates_no_n_by_v_buffer():
    n, v = 64, 50257
    x, t = torch.randn(n, v), _targets(n, v)
    nv_bytes = n * v * 4
    # The detector sees the reference's full log-softmax, so a C++ N x V tensor would fail this test too.
    assert _max_alloc(lambda: token_logprobs_ref(x, t)) >= nv_bytes
    assert _max_alloc(lambda: torch.ops.gvu_kernels.token_logprobs(x, t, 1.0, IGN, True)) < 64 * n
    # linear: at most the chunk's logits (8 rows here), never N x V.
    h, w = torch.randn(n, 64), torch.randn(v, 64)
    peak = _max_alloc(lambda: cpp_ops.linear_token_logprobs_cpp(
        h, w, t, bias=None, temperature=1.0, ignore_index=IGN, return_entropy=True, chunk_size=8))  # fmt: skip
    assert peak <= 8 * v * 4 < nv_bytes


# --------------------------------------------------------------------------------------------------------------
# linear_token_logprobs


def _linear_run(fn, h, w, b, t, w_lp, w_ent, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    lp, ent = fn(h, w, t, bias=b, **kw)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _lin_cpp(h, w, t, **kw):
    return cpp_ops.linear_token_logprobs_cpp(h, w, t, return_entropy=True, **kw)


def _lin_ref(upcast):
    def fn(h, w, t, chunk_size=None, **kw):
        return linear_token_logprobs_ref(h, w, t, return_entropy=True, upcast_dtype=upcast, **kw)

    return fn


def _lin_eager(h, w, t, bias=None, **kw):
    """What eager PyTorch does in the inputs' dtype: logits from a bf16/fp16 GEMM, then fp32 log-softmax."""
    logits = h @ w.T + (bias if bias is not None else 0)
    return token_logprobs_ref(logits, t, return_entropy=True, **kw)


def _check_linear(h, w, b, t, chunk_size, temperature=1.0, atol=1e-5, gatol=1e-5):
    n = h.shape[0]
    w_lp, w_ent = torch.randn(n), torch.randn(n)
    kw = dict(temperature=temperature, ignore_index=IGN)
    out = _linear_run(_lin_cpp, h, w, b, t, w_lp, w_ent, chunk_size=chunk_size, **kw)
    b64 = b.double() if b is not None else None
    ref = _linear_run(_lin_ref(torch.float64), h.double(), w.double(), b64, t, w_lp.double(), w_ent.double(), **kw)
    # The op's chunk logits come out of the GEMM in weight's dtype, as eager's do (no fp32-output GEMM for
    # bf16 inputs on CPU), so its error is judged against eager's in that dtype.
    same = _linear_run(_lin_eager, h, w, b, t, w_lp, w_ent, **kw)
    for name, o, r, s in zip(("logp", "entropy", "dH", "dW", "db"), out, ref, same, strict=True):
        if o is None:
            continue
        assert o.dtype == s.dtype and o.shape == s.shape, name
        _assert_close(name, o, r, s, atol if name in ("logp", "entropy") else gatol)
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, 6, 7, 50, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_chunk_borders(chunk_size, with_bias):
    n, d, v = 7, 16, 1001
    h, w = torch.randn(n, d), torch.randn(v, d) * 0.5
    b = torch.randn(v) if with_bias else None
    t = _targets(n, v, ignore_rows=(2,))
    lp, ent, dh, _, _ = _check_linear(h, w, b, t, chunk_size, temperature=0.8)
    assert lp[2] == 0 and ent[2] == 0 and (dh[2] == 0).all()


def test_linear_large_vocab_and_all_ignored():
    h, w = torch.randn(3, 32), torch.randn(50257, 32) * 0.3
    _check_linear(h, w, torch.randn(50257), _targets(3, 50257), None)
    t = torch.full((3,), IGN)
    hg = h.clone().requires_grad_()
    lp, ent = cpp_ops.linear_token_logprobs_cpp(hg, w, t, bias=None, temperature=1.0, ignore_index=IGN,
                                                return_entropy=True, chunk_size=None)  # fmt: skip
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (hg.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_vocab_block_borders(dtype):
    # The backward tiles V in blocks of 8192: targets on both sides of each border, the last block partial.
    n, d, v = 6, 24, 20000
    h, w = torch.randn(n, d).to(dtype), (torch.randn(v, d) * 0.3).to(dtype)
    t = torch.tensor([8191, 8192, 16383, 16384, 0, v - 1])
    _check_linear(h, w, torch.randn(v).to(dtype), t, 4, atol=1e-4, gatol=1e-4)


def test_linear_backward_has_no_fp32_weight_sized_buffer():
    n, d, v = 32, 64, 20000
    h = torch.randn(n, d).bfloat16().requires_grad_()
    w = (torch.randn(v, d) * 0.3).bfloat16().requires_grad_()
    lp, _ = cpp_ops.linear_token_logprobs_cpp(h, w, _targets(n, v), bias=None, temperature=1.0, ignore_index=IGN,
                                              return_entropy=False, chunk_size=8)  # fmt: skip
    g = torch.randn(n)
    # The bf16 dW itself (v * d * 2 bytes) is the largest tensor; a whole fp32 accumulator would be twice that.
    assert _max_alloc(lambda: lp.backward(g)) <= v * d * 2 + 65536  # + allocator slack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_low_precision(dtype):
    h, w = torch.randn(20, 64).to(dtype), (torch.randn(3000, 64) * 0.2).to(dtype)
    b = (torch.randn(3000) * 0.1).to(dtype)
    _check_linear(h, w, b, _targets(20, 3000, ignore_rows=(4,)), 6, atol=1e-4, gatol=1e-4)


def test_linear_bf16_many_rows_and_v_blocks():
    # 2500 kept rows: dH's partials go in 1024-row slices; V=9000 spans two V-blocks (8192 + 808).
    h, w = torch.randn(2500, 16).bfloat16(), (torch.randn(9000, 16) * 0.3).bfloat16()
    b = (torch.randn(9000) * 0.1).bfloat16()
    _check_linear(h, w, b, _targets(2500, 9000, ignore_rows=(5, 2400)), None, temperature=0.9, atol=1e-4, gatol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 0])
def test_linear_bf16_weight_grad_accumulates_in_fp32(chunk_size):
    # chunk_size 1: 256 one-row chunks, where bf16 accumulation of dW across chunks would round 256 times.
    # chunk_size 0: the default single chunk, where dW is one bf16-input GEMM over all rows (eager's rounding).
    n, d, v = 256, 32, 64
    h = torch.randn(n, d).bfloat16()
    w = (torch.randn(v, d) * 0.3).bfloat16()
    t = _targets(n, v)
    w_lp = torch.randn(n)
    wg = w.clone().requires_grad_()
    lp, _ = cpp_ops.linear_token_logprobs_cpp(h, wg, t, bias=None, temperature=1.0, ignore_index=IGN,
                                              return_entropy=False, chunk_size=chunk_size)  # fmt: skip
    (lp * w_lp).sum().backward()
    w64 = w.double().requires_grad_()
    (linear_token_logprobs_ref(h.double(), w64, t, upcast_dtype=torch.float64) * w_lp.double()).sum().backward()
    # What accumulating in bf16 would give: the per-row fp32 contributions summed in bf16.
    logits = (h.double() @ w.double().T).float()
    g_logits = (torch.nn.functional.one_hot(t, v) - torch.softmax(logits, -1)) * w_lp[:, None]
    naive = torch.zeros(v, d, dtype=torch.bfloat16)
    for r in range(n):
        naive += (g_logits[r, :, None] * h[r].float()[None, :]).bfloat16()
    err, err_naive = _err(wg.grad, w64.grad), _err(naive, w64.grad)
    scale = w64.grad.abs().max().item()
    assert err <= 2**-8 * scale, f"dW err {err:.3g} beyond one bf16 rounding of {scale:.3g}"
    assert err_naive > 2 * err, "the check cannot tell fp32 from bf16 accumulation"


# --------------------------------------------------------------------------------------------------------------
# linear_token_logprobs with a frozen head (hidden requires grad, weight/bias do not): the no-recompute backward


def _frozen_run(fn, h, w, b, t, w_lp, w_ent, **kw):
    h = h.detach().clone().requires_grad_()
    lp, ent = fn(h, w.detach(), t, bias=b.detach() if b is not None else None, **kw)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return lp, ent, h.grad


def _check_frozen(h, w, b, t, chunk_size, temperature=1.0, atol=1e-5, gatol=1e-5, entropy=True):
    n = h.shape[0]
    w_lp = torch.randn(n)
    w_ent = torch.randn(n) if entropy else torch.zeros(n)  # zeros: entropy unused, as with return_entropy=False
    kw = dict(temperature=temperature, ignore_index=IGN)

    def cpp(h, w, t, **k):
        lp, ent = cpp_ops.linear_token_logprobs_cpp(h, w, t, return_entropy=entropy, chunk_size=chunk_size, **k)
        assert "linear_token_logprobs_frozen" in lp.grad_fn.name(), f"fast path not taken: {lp.grad_fn.name()}"
        return lp, (ent if entropy else torch.zeros_like(lp))

    out = _frozen_run(cpp, h, w, b, t, w_lp, w_ent, **kw)
    b64 = b.double() if b is not None else None
    ref = _frozen_run(_lin_ref(torch.float64), h.double(), w.double(), b64, t, w_lp.double(), w_ent.double(), **kw)
    same = _frozen_run(_lin_eager, h, w, b, t, w_lp, w_ent, **kw)
    for name, o, r, s in zip(("logp", "entropy", "dH"), out, ref, same, strict=True):
        if name == "entropy" and not entropy:
            continue
        assert o.dtype == s.dtype and o.shape == s.shape, name
        _assert_close(name, o.detach(), r.detach(), s.detach(), atol if name != "dH" else gatol)
    return [o.detach() for o in out]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
def test_linear_frozen_head_matches_reference(dtype, entropy, chunk_size):
    n, d, v = 7, 16, 1001
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    # Low precision: logits of a few units, as in test_linear_low_precision. At |z| ~ 10 the fp16 GEMM's own
    # rounding of the logits (shared with the recompute path; addmm rounds once, eager's h @ W.T + b twice)
    # decides the forward error by luck of the draw (0.0053 vs eager's 0.0016 once).
    sw, sb = (0.5, 1.0) if dtype == torch.float32 else (0.2, 0.1)
    h, w = torch.randn(n, d).to(dtype), (torch.randn(v, d) * sw).to(dtype)
    b = (torch.randn(v) * sb).to(dtype)
    t = _targets(n, v, ignore_rows=(2, 6))  # 6: the last row, so the last chunk may hold only ignored rows
    lp, ent, dh = _check_frozen(h, w, b, t, chunk_size, temperature=0.8, atol=tol, gatol=tol, entropy=entropy)
    assert lp[2] == lp[6] == 0 and (dh[2] == 0).all() and (dh[6] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_frozen_head_large_vocab_confident_rows(dtype):
    # Rows with p(target) ~ 1: dH ~ W[t] - E is a small difference of large rows (the cancellation case).
    n, d, v = 6, 24, 50257
    h, w = torch.randn(n, d).to(dtype), (torch.randn(v, d) * 0.3).to(dtype)
    t = _targets(n, v)
    h[:3] = (w[t[:3]].float() * 4).to(dtype)
    _check_frozen(h, w, None, t, 4, temperature=1.3, atol=1e-4, gatol=1e-4)


def test_linear_frozen_head_all_ignored_and_mixed_dtypes():
    h, w = torch.randn(3, 32, requires_grad=True), torch.randn(500, 32)
    lp, ent = cpp_ops.linear_token_logprobs_cpp(h, w, torch.full((3,), IGN), bias=None, temperature=1.0,
                                                ignore_index=IGN, return_entropy=True, chunk_size=None)  # fmt: skip
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (h.grad == 0).all()
    # fp32 hidden with a bf16 head: the op runs in the weight's dtype, the gradient comes back in hidden's.
    h, w, t = torch.randn(5, 32), (torch.randn(500, 32) * 0.2).bfloat16(), _targets(5, 500)
    hg = h.clone().requires_grad_()
    lp, ent = cpp_ops.linear_token_logprobs_cpp(hg, w, t, bias=None, temperature=1.0, ignore_index=IGN,
                                                return_entropy=True, chunk_size=2)  # fmt: skip
    (lp.sum() + ent.sum()).backward()
    h64 = h.double().requires_grad_()
    lp64, ent64 = linear_token_logprobs_ref(h64, w.double(), t, return_entropy=True, upcast_dtype=torch.float64)
    (lp64.sum() + ent64.sum()).backward()  # the reference returns fp32
    assert hg.grad.dtype == torch.float32
    # bf16 logits: ~2^-8 relative error on |z| of a few units
    torch.testing.assert_close(lp.double(), lp64.detach().double(), atol=0.05, rtol=0)
    torch.testing.assert_close(hg.grad.double(), h64.grad, atol=0.02, rtol=0.02)


def test_linear_frozen_head_takes_the_fast_path():
    # Behavioural, not by name: the frozen path saves no hidden and no logits, so changing hidden in place after
    # the forward cannot break its backward (the recompute path must raise: it would recompute wrong logits).
    n, d, v = 8, 16, 300
    w, t, g = torch.randn(v, d), _targets(n, v, ignore_rows=(1,)), torch.randn(n)
    h0 = torch.randn(n, d, requires_grad=True)
    h = h0 * 1.0  # a non-leaf, so it can be changed in place
    lp, _ = cpp_ops.linear_token_logprobs_cpp(h, w, t, bias=None, temperature=1.0, ignore_index=IGN,
                                              return_entropy=False, chunk_size=3)  # fmt: skip
    saved = lp.grad_fn.saved_tensors
    assert not any(x is h or x.data_ptr() == h.data_ptr() for x in saved), "hidden saved: recompute path"
    assert any(x.shape == (n, d) for x in saved), "no (N, D) expected-row tensor saved"
    h.data.add_(100.0)  # .data: no version bump either way, so only a path that reads hidden sees the change
    lp.backward(g)
    h_ref = h0.detach().clone().requires_grad_()
    (linear_token_logprobs_ref(h_ref, w, t) * g).sum().backward()
    torch.testing.assert_close(h0.grad, h_ref.grad, atol=1e-5, rtol=1e-4)
    # The same with a trainable head takes the recompute path, which reads the changed hidden: wrong gradient.
    h0.grad = None
    h = h0 * 1.0
    lp, _ = cpp_ops.linear_token_logprobs_cpp(h, w.clone().requires_grad_(), t, bias=None, temperature=1.0,
                                              ignore_index=IGN, return_entropy=False, chunk_size=3)  # fmt: skip
    h.data.add_(100.0)
    lp.backward(g)
    assert not torch.allclose(h0.grad, h_ref.grad, atol=1e-3), "the check cannot tell the two paths apart"


def test_linear_frozen_head_lse_gradient():
    h = torch.randn(5, 8, requires_grad=True)
    w, b = torch.randn(40, 8), torch.randn(40)
    t = _targets(5, 40, ignore_rows=(1,))
    lp, lse, ent, cen, ent_dir = torch.ops.gvu_kernels.linear_token_logprobs_frozen(h, w, t, b, 0.7, IGN, True, 2)
    assert cen.shape == ent_dir.shape == (5, 8) and (cen[1] == 0).all() and (ent_dir[1] == 0).all()
    g = torch.randn(3, 5)
    (lp * g[0] + lse * g[1] + ent * g[2]).sum().backward()
    h2 = h.detach().clone().requires_grad_()
    z = (h2 @ w.T + b) / 0.7
    keep = t != IGN
    lse2 = torch.where(keep, torch.logsumexp(z, -1), 0.0)
    lp2, ent2 = linear_token_logprobs_ref(h2, w, t, bias=b, temperature=0.7, return_entropy=True)
    (lp2 * g[0] + lse2 * g[1] + ent2 * g[2]).sum().backward()
    torch.testing.assert_close(lse, lse2.detach())
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)


# ZeRO-3 regression (the DeepSpeed toy run failed in this backward): a gathered parameter's storage is released
# when its GatheredParameters block exits, so a weight saved for backward is empty by then. DeepSpeed does this
# with `param.data = torch.empty(0)`; reproduced here without it.


def test_linear_backward_after_weight_released():
    n, d, v = 6, 8, 50
    t, g = _targets(n, v, ignore_rows=(0,)), torch.randn(n)
    w = torch.nn.Parameter(torch.randn(v, d))
    h = torch.randn(n, d, requires_grad=True)
    lp, _ = cpp_ops.linear_token_logprobs_cpp(h, w, t, bias=None, temperature=1.0, ignore_index=IGN,
                                              return_entropy=False, chunk_size=None)  # fmt: skip
    w.data = torch.empty(0)
    with pytest.raises(RuntimeError, match="ZeRO-3"):  # trainable head: a clear error, not a shape mismatch
        lp.backward(g)
    # Frozen head: the logp / entropy backward never reads the weight, so releasing it is harmless.
    w = torch.nn.Parameter(torch.randn(v, d), requires_grad=False)
    w_keep = w.detach().clone()
    h.grad = None
    lp, ent = cpp_ops.linear_token_logprobs_cpp(h, w, t, bias=None, temperature=1.0, ignore_index=IGN,
                                                return_entropy=True, chunk_size=None)  # fmt: skip
    w.data = torch.empty(0)
    (lp * g + ent).sum().backward()
    h2 = h.detach().clone().requires_grad_()
    lp2, ent2 = linear_token_logprobs_ref(h2, w_keep, t, return_entropy=True)
    (lp2 * g + ent2).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# group_advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
def test_group_advantages_matches_reference(scale, unbiased, group_size):
    r = torch.randn(8 * group_size)
    r[3] = float("nan")
    if group_size >= 4:
        r[group_size : 2 * group_size] = 0.5  # zero spread -> 0
        r[2 * group_size : 3 * group_size - 1] = float("nan")  # one valid reward -> 0
    kw = dict(eps=1e-4, scale=scale, unbiased=unbiased)
    out = cpp_ops.group_advantages_cpp(r, group_size, **kw)
    ref = group_advantages_ref(r, group_size, **kw)
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    if group_size == 1:
        assert (out == 0).all()


def test_group_advantages_dtypes_and_empty():
    r = torch.randn(64, dtype=torch.float64)
    torch.testing.assert_close(cpp_ops.group_advantages_cpp(r, 8, eps=1e-4, scale="group", unbiased=True),
                               group_advantages_ref(r, 8))  # fmt: skip
    assert cpp_ops.group_advantages_cpp(torch.zeros(0), 4, eps=1e-4, scale="group", unbiased=True).shape == (0,)
    with pytest.raises(RuntimeError, match="multiple"):
        cpp_ops.group_advantages_cpp(torch.zeros(6), 4, eps=1e-4, scale="group", unbiased=True)


# --------------------------------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake kernels, autograd registration, AOT dispatch


def test_opcheck_token_logprobs():
    ops = torch.ops.gvu_kernels
    x = torch.randn(5, 33, requires_grad=True)
    t = _targets(5, 33, ignore_rows=(1,))
    torch.library.opcheck(ops.token_logprobs.default, (x, t, 0.9, IGN, True))
    torch.library.opcheck(ops.token_logprobs.default, (x.detach().bfloat16(), t, 1.0, IGN, False))
    _, lse, ent = ops.token_logprobs(x.detach(), t, 0.9, IGN, True)
    args = (torch.randn(5), None, torch.randn(5), x.detach(), t, lse, ent, 0.9, IGN)
    torch.library.opcheck(ops.token_logprobs_backward.default, args)


def test_opcheck_linear_token_logprobs():
    ops = torch.ops.gvu_kernels
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    t = _targets(5, 40, ignore_rows=(3,))
    torch.library.opcheck(ops.linear_token_logprobs.default, (h, w, t, b, 0.9, IGN, True, 2))
    torch.library.opcheck(ops.linear_token_logprobs.default, (h, w, t, None, 1.0, IGN, False, 0))
    _, lse, ent = ops.linear_token_logprobs(h.detach(), w.detach(), t, b.detach(), 0.9, IGN, True, 2)
    args = (torch.randn(5), None, torch.randn(5), h.detach(), w.detach(), t, b.detach(), lse, ent, 0.9, IGN, 2,
            [True, True, True])  # fmt: skip
    torch.library.opcheck(ops.linear_token_logprobs_backward.default, args)
    # The frozen-head forward: autograd w.r.t. hidden only (weight and bias frozen), with and without entropy.
    for b_, ent in ((b.detach(), True), (None, False)):
        torch.library.opcheck(ops.linear_token_logprobs_frozen.default, (h, w.detach(), t, b_, 0.9, IGN, ent, 2))
    args = (h.detach().bfloat16().requires_grad_(), w.detach().bfloat16(), t, None, 1.0, IGN, True, 0)
    torch.library.opcheck(ops.linear_token_logprobs_frozen.default, args)


def test_opcheck_group_advantages():
    r = torch.randn(16)
    r[2] = float("nan")
    for scale in ("group", "batch", "none"):
        torch.library.opcheck(torch.ops.gvu_kernels.group_advantages.default, (r, 4, 1e-4, scale, True))
