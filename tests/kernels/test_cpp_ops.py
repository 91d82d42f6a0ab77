"""What only the C++ backend has: its torch.library registration (opcheck), extra outputs (lse), the linear op's
three forwards (frozen-head sums, saved logits, recompute) and which one a call takes, ZeRO-3 released weights,
and allocation bounds. Numerics are in test_<op>.py (which, on a trainable head, take the saved forward unless
GVU_KERNELS_SAVE_LOGITS_MB=0); both backwards of a trainable head are forced here."""

from __future__ import annotations

import pytest
import torch
from _compare import IGN, targets
from torch.profiler import ProfilerActivity, profile

from kernels import cpp_ops
from kernels.reference import linear_token_logprobs_ref, token_logprobs_ref

pytestmark = pytest.mark.skipif(not cpp_ops.available(), reason=f"C++ ops not built: {cpp_ops.load_error()}")


def _lin(h, w, t, **kw):
    kw = dict(dict(bias=None, temperature=1.0, ignore_index=IGN, return_entropy=False, chunk_size=None), **kw)
    return cpp_ops.linear_token_logprobs_cpp(h, w, t, **kw)


def test_library_layout():
    assert cpp_ops.library_path() and cpp_ops.load_error() is None
    assert cpp_ops.simd_level() in ("avx512", "avx512-plain", "avx2", "baseline")
    assert cpp_ops.default_chunk_size(10, 32000) == 10 and 16 <= cpp_ops.default_chunk_size(4096, 151936) <= 256


# ------------------------------------------------------------------------------------------ token_logprobs


def test_lse_output_and_its_gradient():
    x = torch.randn(4, 777, dtype=torch.float64).float().requires_grad_()
    t = targets((4,), 777, ignore_every=0)
    _, lse, _, _ = torch.ops.gvu_kernels.token_logprobs(x, t, 0.8, IGN, False)
    torch.testing.assert_close(lse, torch.logsumexp(x.detach() / 0.8, -1))
    w = torch.randn(4)
    (lse * w).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (torch.logsumexp(xr / 0.8, -1) * w).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-7, rtol=1e-5)


def test_op_checks_targets_itself():
    # The op is also callable as torch.ops.gvu_kernels.*, past kernels.ops: it must not read out of bounds.
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.gvu_kernels.token_logprobs(torch.randn(2, 10), torch.tensor([3, 10]), 1.0, IGN, False)
    with pytest.raises(RuntimeError, match="multiple"):
        cpp_ops.group_advantages_cpp(torch.zeros(6), 4, eps=1e-4, scale="group", unbiased=True)


def _reused() -> list[int]:
    """[token gradients, saved logits] reused so far by the ops (csrc/rows.h: reusable_rows)."""
    return list(torch.ops.gvu_kernels.reuse_counts())


def test_backward_reuses_its_gradient_buffer_only_once_nothing_holds_it(monkeypatch):
    """GVU_KERNELS_REUSE_MB: a backward writes into the buffer it kept from the last one once that gradient is freed,
    never while it is alive (a kept .grad keeps its values), not past the budget or at 0; a bad value names the
    variable."""
    from kernels.ops import token_logprobs

    monkeypatch.delenv("GVU_KERNELS_REUSE_MB", raising=False)
    base = torch.randn(6, 300)
    t = targets((6,), 300, ignore_every=0)

    def grad(scale=1.0):
        x = base.clone().requires_grad_()
        (token_logprobs(x, t) * scale).sum().backward()
        return x.grad

    def reuses(fn):
        before = _reused()[0]
        out = fn()
        return out, _reused()[0] - before

    first, n = reuses(grad)
    kept = first.clone()
    second, n = reuses(lambda: grad(2.0))  # first is alive: a fresh buffer, and first's values stay
    assert n == 0 and torch.equal(first, kept)
    torch.testing.assert_close(second, 2 * kept)
    ptr = second.data_ptr()
    del first, second
    third, n = reuses(grad)  # the newest kept buffer: second's
    assert n == 1 and third.data_ptr() == ptr
    torch.testing.assert_close(third, kept)
    del third
    monkeypatch.setenv("GVU_KERNELS_REUSE_MB", str(6 * 300 * 4 / 2**20 / 2))  # half of one gradient
    assert reuses(grad)[1] == 0
    monkeypatch.setenv("GVU_KERNELS_REUSE_MB", "0")
    assert reuses(grad)[1] == 0 and reuses(grad)[1] == 0
    monkeypatch.setenv("GVU_KERNELS_REUSE_MB", "abc")
    with pytest.raises(ValueError, match="GVU_KERNELS_REUSE_MB"):
        grad()


def test_saved_logits_reuse_the_last_buffer_and_clear_its_ignored_rows(monkeypatch):
    """A trainable head's saved logits go into the buffer kept from the last call once nothing holds it; the rows
    of ignored targets, stale from the last call, are zero again, and the gradients match fresh buffers'."""
    ops = torch.ops.gvu_kernels
    h, w = torch.randn(6, 8), torch.randn(500, 8)
    full, some = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([1, IGN, 3, IGN, 5, 6])
    saved = lambda t: ops.linear_token_logprobs_saved(h, w, t, None, 1.0, IGN, False, 0, 1 << 20)[3]  # noqa: E731
    first = saved(full)
    n0 = _reused()[1]
    held = saved(full)
    assert _reused()[1] == n0  # first is alive
    del first, held
    again = saved(some)
    assert _reused()[1] == n0 + 1 and (again[4:] == 0).all()
    torch.testing.assert_close(again[:4], h[some != IGN] @ w.T, atol=1e-5, rtol=1e-5)
    del again

    def grads():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, _ = _lin(hh, ww, some)
        return torch.autograd.grad(lp.sum(), (hh, ww))

    monkeypatch.setenv("GVU_KERNELS_SAVE_LOGITS_MB", "1")
    monkeypatch.setenv("GVU_KERNELS_REUSE_MB", "1")
    grads()
    n1 = _reused()[1]
    reused = grads()
    assert _reused()[1] == n1 + 1
    monkeypatch.setenv("GVU_KERNELS_REUSE_MB", "0")
    for a, b in zip(reused, grads(), strict=True):
        torch.testing.assert_close(a, b)


def _max_alloc(fn) -> int:
    """Largest single tensor allocation while fn runs (torch.profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_forward_allocates_no_n_by_v_buffer():
    n, v = 64, 50257
    x, t = torch.randn(n, v), targets((n,), v)
    nv_bytes = n * v * 4
    # The detector sees the reference's full log-softmax, so a C++ N x V tensor would fail this test too.
    assert _max_alloc(lambda: token_logprobs_ref(x, t)) >= nv_bytes
    assert _max_alloc(lambda: torch.ops.gvu_kernels.token_logprobs(x, t, 1.0, IGN, True)) < 64 * n
    # linear: at most the chunk's logits (8 rows here), never N x V.
    h, w = torch.randn(n, 64), torch.randn(v, 64)
    peak = _max_alloc(lambda: _lin(h, w, t, return_entropy=True, chunk_size=8))
    assert peak <= 8 * v * 4 < nv_bytes


@pytest.mark.parametrize("budget_mb", ["0", "1000"])  # recompute, saved logits
def test_linear_backward_has_no_fp32_weight_sized_buffer(monkeypatch, budget_mb):
    monkeypatch.setenv("GVU_KERNELS_SAVE_LOGITS_MB", budget_mb)
    n, d, v = 32, 64, 20000
    h = torch.randn(n, d).bfloat16().requires_grad_()
    w = (torch.randn(v, d) * 0.3).bfloat16().requires_grad_()
    lp, _ = _lin(h, w, targets((n,), v), chunk_size=8)
    g = torch.randn(n)
    # The bf16 dW itself (v * d * 2 bytes) is the largest tensor; a whole fp32 accumulator would be twice that.
    assert _max_alloc(lambda: lp.backward(g)) <= v * d * 2 + 65536  # + allocator slack


# ---------------------------------------------------------------------------- linear, frozen-head forward


def test_forward_kind_by_requires_grad_and_budget(monkeypatch):
    # No switch but the budget: a frozen head with hidden needing a gradient -> the forward with the (N, D) sums;
    # a trainable head -> saved logits when N x V fits GVU_KERNELS_SAVE_LOGITS_MB, else the recompute backward.
    from kernels.cpp_ops.linear_token_logprobs import forward_kind, logits_budget_bytes

    h = torch.randn(3, 4, requires_grad=True)
    w, b = torch.randn(50, 4), torch.randn(50)
    assert forward_kind(h, w, b) == "sums" and forward_kind(h.detach(), w, b) == "plain"
    wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
    monkeypatch.delenv("GVU_KERNELS_SAVE_LOGITS_MB", raising=False)
    assert 0 < logits_budget_bytes() <= 2 << 30
    for args in ((h, wt, None), (h.detach(), wt, None), (h, w, bt)):
        assert forward_kind(*args) == "saved"
    monkeypatch.setenv("GVU_KERNELS_SAVE_LOGITS_MB", "0")
    assert forward_kind(h, wt, b) == forward_kind(h, w, bt) == "plain"
    monkeypatch.setenv("GVU_KERNELS_SAVE_LOGITS_MB", str(3 * 50 * 4 / 2**20))  # exactly the fp32 logits
    assert forward_kind(h, wt, b) == "saved"
    assert forward_kind(torch.randn(4, 4, requires_grad=True), wt, b) == "plain"
    with torch.no_grad():
        assert forward_kind(h, wt, bt) == "plain"
    for bad in ("2GB", "-1"):  # a bad budget names the variable and the fix
        monkeypatch.setenv("GVU_KERNELS_SAVE_LOGITS_MB", bad)
        with pytest.raises(ValueError, match="GVU_KERNELS_SAVE_LOGITS_MB"):
            logits_budget_bytes()


def test_each_forward_saves_what_its_backward_reads(monkeypatch):
    # Behavioural, not by name: change hidden in place after the forward (.data: no version bump, so only a
    # backward that reads hidden sees it) and see which gradients go wrong.
    #   sums (frozen head): saves no hidden and no logits -> dH stays right;
    #   saved (trainable): dH = G W from the saved logits stays right, dW = G^T H reads hidden -> wrong;
    #   plain (trainable, budget 0): recomputes the logits from hidden -> dH wrong too.
    n, d, v = 8, 16, 300
    w, g = torch.randn(v, d), torch.randn(n)
    t = targets((n,), v, ignore_every=0)
    t[1] = IGN
    h_ref, w_ref = torch.randn(n, d, requires_grad=True), w.clone().requires_grad_()
    (linear_token_logprobs_ref(h_ref, w_ref, t) * g).sum().backward()

    def run(trainable):
        h0 = h_ref.detach().clone().requires_grad_()
        h = h0 * 1.0  # a non-leaf, so it can be changed in place
        w_ = w.clone().requires_grad_(trainable)
        lp, _ = _lin(h, w_, t, chunk_size=3)
        saved = [x for x in lp.grad_fn.saved_tensors if x is not None]
        h.data.add_(100.0)
        lp.backward(g)
        return h0.grad, w_.grad, saved

    close = lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-4)  # noqa: E731
    dh, _, saved = run(trainable=False)
    assert not any(x.data_ptr() == h_ref.data_ptr() for x in saved)
    assert any(x.shape == (n, d) for x in saved), "no (N, D) expected-row tensor saved"
    assert close(dh, h_ref.grad)
    monkeypatch.setenv("GVU_KERNELS_SAVE_LOGITS_MB", "100")
    dh, dw, saved = run(trainable=True)
    assert any(x.shape == (n, v) for x in saved), "no logits saved"
    assert close(dh, h_ref.grad) and not close(dw, w_ref.grad)
    monkeypatch.setenv("GVU_KERNELS_SAVE_LOGITS_MB", "0")
    dh, dw, saved = run(trainable=True)
    assert not any(x.shape == (n, v) for x in saved)
    assert not close(dh, h_ref.grad) and not close(dw, w_ref.grad)


def _op_fn(kind):
    """fn(h, w, t, bias=, return_entropy=, ...) on one forward op, whatever forward_kind would pick."""
    op = {"sums": "linear_token_logprobs_frozen", "saved": "linear_token_logprobs_saved"}.get(
        kind, "linear_token_logprobs"
    )

    def fn(h, w, t, *, bias, return_entropy, temperature, ignore_index, chunk_size=None):
        out = getattr(torch.ops.gvu_kernels, op)(h, w, t, bias, temperature, ignore_index, return_entropy,
                                                 chunk_size or 0)  # fmt: skip
        return (out[0], out[2]) if return_entropy else out[0]

    return fn


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("head", ["trainable", "weight", "frozen"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_and_recompute_backwards(dtype, entropy, bias, head, chunk_size):
    # Each forward forced (the op itself, not forward_kind): logp, entropy and every gradient against the fp64
    # reference by the suite's rule, and the saved backward equal to the recompute one up to float rounding.
    # V = 9000 spans two backward V-blocks; ignored rows in the middle and at the end.
    from _compare import assert_close, eager_linear, ref_linear, run_linear, upstream

    n, d, v = 13, 24, 9000
    torch.manual_seed(0)
    h = torch.randn(n, d).to(dtype)
    w = (torch.randn(v, d) * 0.3).to(dtype)
    b = (torch.randn(v) * 0.1).to(dtype) if bias else None
    t = targets((n,), v, ignore_every=4)
    t[-1] = IGN
    grads = {"trainable": ("hidden", "weight", "bias"), "weight": ("weight",), "frozen": ("hidden",)}[head]
    kw = dict(temperature=0.8, ignore_index=IGN, grads=grads)
    g, ge = upstream((n,))
    same = run_linear(eager_linear, h, w, b, t, g, ge, entropy, **kw)
    b64 = b.double() if bias else None
    ref = run_linear(ref_linear, h.double(), w.double(), b64, t, g.double(), ge.double(), entropy, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    kinds = ("saved", "plain") + (("sums",) if head == "frozen" else ())
    outs = {k: run_linear(_op_fn(k), h, w, b, t, g, ge, entropy, chunk_size=chunk_size, **kw) for k in kinds}
    names = ("logp", "entropy", "d_hidden", "d_weight", "d_bias")
    for kind, out in outs.items():
        for i, (name, o, s_, r) in enumerate(zip(names, out[:5], same[:5], ref[:5], strict=True)):
            assert (o is None) == (s_ is None), (kind, name)
            if o is not None:
                assert_close(f"{kind} {name}", o, s_, r, tol if i < 2 else tol * (1 + r.abs().max().item()))
    if dtype == torch.float32:  # the same numbers either way, up to the GEMMs' rounding
        for a, c in zip(outs["saved"][:5], outs["plain"][:5], strict=True):
            if a is not None:
                torch.testing.assert_close(a, c, atol=2e-6, rtol=1e-5)


def test_saved_backward_runs_twice():
    # retain_graph: the saved backward writes its grad-logits into a tile buffer, never over the saved logits.
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(500, 8, requires_grad=True)
    t = targets((6,), 500)
    lp, _, ent, logits = torch.ops.gvu_kernels.linear_token_logprobs_saved(h, w, t, None, 1.0, IGN, True, 0)
    kept = int((t != IGN).sum())
    z = h.detach()[t != IGN] @ w.detach().T
    torch.testing.assert_close(logits[:kept], z, atol=1e-5, rtol=1e-5)
    assert (logits[kept:] == 0).all()
    loss = (lp + 0.5 * ent).sum()
    g1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(loss, (h, w))
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)


def test_frozen_head_lse_gradient():
    h = torch.randn(5, 8, requires_grad=True)
    w, b = torch.randn(40, 8), torch.randn(40)
    t = targets((5,), 40, ignore_every=0)
    t[1] = IGN
    lp, lse, ent, cen, ent_dir = torch.ops.gvu_kernels.linear_token_logprobs_frozen(h, w, t, b, 0.7, IGN, True, 2)
    assert cen.shape == ent_dir.shape == (5, 8) and (cen[1] == 0).all() and (ent_dir[1] == 0).all()
    g = torch.randn(3, 5)
    (lp * g[0] + lse * g[1] + ent * g[2]).sum().backward()
    h2 = h.detach().clone().requires_grad_()
    z = (h2 @ w.T + b) / 0.7
    lse2 = torch.where(t != IGN, torch.logsumexp(z, -1), 0.0)
    lp2, ent2 = linear_token_logprobs_ref(h2, w, t, bias=b, temperature=0.7, return_entropy=True)
    (lp2 * g[0] + lse2 * g[1] + ent2 * g[2]).sum().backward()
    torch.testing.assert_close(lse, lse2.detach())
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)


# ZeRO-3 regression (the DeepSpeed toy run failed in this backward): a gathered parameter's storage is released
# when its GatheredParameters block exits, so a weight saved for backward is empty by then. DeepSpeed does this
# with `param.data = torch.empty(0)`; reproduced here without it.


def test_linear_backward_after_weight_released():
    n, d, v = 6, 8, 50
    t, g = targets((n,), v, ignore_every=0), torch.randn(n)
    t[0] = IGN
    w = torch.nn.Parameter(torch.randn(v, d))
    h = torch.randn(n, d, requires_grad=True)
    lp, _ = _lin(h, w, t)
    w.data = torch.empty(0)
    with pytest.raises(RuntimeError, match="ZeRO-3"):  # trainable head: a clear error, not a shape mismatch
        lp.backward(g)
    # Frozen head: the logp / entropy backward never reads the weight, so releasing it is harmless.
    w = torch.nn.Parameter(torch.randn(v, d), requires_grad=False)
    w_keep = w.detach().clone()
    h.grad = None
    lp, ent = _lin(h, w, t, return_entropy=True)
    w.data = torch.empty(0)
    (lp * g + ent).sum().backward()
    h2 = h.detach().clone().requires_grad_()
    lp2, ent2 = linear_token_logprobs_ref(h2, w_keep, t, return_entropy=True)
    (lp2 * g + ent2).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- opcheck: schema, fake, autograd, AOT


def test_opcheck_token_logprobs():
    ops = torch.ops.gvu_kernels
    x = torch.randn(5, 33, requires_grad=True)
    t = targets((5,), 33)
    torch.library.opcheck(ops.token_logprobs.default, (x, t, 0.9, IGN, True))
    torch.library.opcheck(ops.token_logprobs.default, (x.detach().bfloat16(), t, 1.0, IGN, False))
    _, _, ent, stats = ops.token_logprobs(x.detach(), t, 0.9, IGN, True)
    args = (torch.randn(5), None, torch.randn(5), x.detach(), t, stats, ent, 0.9, IGN)
    torch.library.opcheck(ops.token_logprobs_backward.default, args)


def test_opcheck_linear_token_logprobs():
    ops = torch.ops.gvu_kernels
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    t = targets((5,), 40)
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
    # The saved-logits forward and its backward.
    torch.library.opcheck(ops.linear_token_logprobs_saved.default, (h, w, t, b, 0.9, IGN, True, 2))
    torch.library.opcheck(ops.linear_token_logprobs_saved.default, (h, w, t, None, 1.0, IGN, False, 0))
    _, lse, ent, logits = ops.linear_token_logprobs_saved(h.detach(), w.detach(), t, b.detach(), 0.9, IGN, True, 0)
    args = (torch.randn(5), None, torch.randn(5), logits, h.detach(), w.detach(), t, b.detach(), lse, ent, 0.9, IGN,
            0, [True, True, True])  # fmt: skip
    torch.library.opcheck(ops.linear_token_logprobs_saved_backward.default, args)


def test_opcheck_group_advantages():
    r = torch.randn(16)
    r[2] = float("nan")
    for scale in ("group", "batch", "none"):
        torch.library.opcheck(torch.ops.gvu_kernels.group_advantages.default, (r, 4, 1e-4, scale, True))


# ------------------------------------------------- fp32 tiles (CPUs without native bf16), forced on this one


@pytest.mark.parametrize("budget_mb", ["", "0"])  # trainable heads: saved logits (default budget), recompute
def test_fp32_tiles_path_matches_the_reference(budget_mb):
    # The path a CPU without avx512_bf16 / amx_bf16 takes (bf16 / fp16 products in fp32 tiles), forced by
    # GVU_KERNELS_FP32_TILES=1 (read once per process, so in a fresh one): the low-precision linear tests hold.
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    check = "import torch, kernels.cpp_ops as c; assert c.available() and torch.ops.gvu_kernels.fp32_tiles()"
    root = os.path.dirname(os.path.dirname(here))  # this checkout's kernels, not an installed one
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, GVU_KERNELS_FP32_TILES="1", PYTHONPATH=path, GVU_KERNELS_SAVE_LOGITS_MB=budget_mb)
    subprocess.run([sys.executable, "-c", check], env=env, check=True, cwd=root)
    sel = "cpp and (low_precision or bf16 or frozen_head_matches or chunk_borders or block_borders)"
    files = [os.path.join(here, "test_linear_token_logprobs.py")]
    if budget_mb == "0":  # once: it forces each forward itself
        files.append(os.path.join(here, "test_cpp_ops.py"))
        sel = f"({sel}) or saved_and_recompute"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", sel]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert p.returncode == 0 and " passed" in p.stdout, p.stdout[-3000:]


# ------------------------------------------ the AVX-512 intrinsic exp loops (csrc/row_kernels.cpp) vs plain loops


def _row_results() -> dict:
    """token_logprobs (logp, entropy, grad) on rows with tails of every length mod 16 / 32, -inf, values below the
    exp floor once the max is subtracted, and NaN, for each dtype and row length."""
    torch.manual_seed(0)
    out = {}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for v in (1, 15, 17, 33, 2047, 2049, 4100):
            x = (torch.randn(5, v, dtype=torch.float64) * 6).to(dt)
            x[1, ::3] = float("-inf")
            x[2, : v // 2] = -200.0
            x[3, v // 2] = float("nan")
            x[4] = 0.0
            xr = x.clone().requires_grad_()
            logp, _, ent, _ = torch.ops.gvu_kernels.token_logprobs(xr, torch.randint(0, v, (5,)), 0.7, IGN, True)
            (g,) = torch.autograd.grad((logp * 0.3).sum() + (ent * 0.2).sum(), xr)
            out[(str(dt), v)] = (logp.detach(), ent.detach(), g.float())
    return out


@pytest.mark.skipif(cpp_ops.simd_level() not in ("avx512", "avx512-plain"), reason="x86-64-v4 CPUs only")
def test_avx512_exp_loops_match_the_plain_loops():
    # Both loops on this CPU, switched between calls: the same results to fp32 rounding, the same NaN positions,
    # and exact zeros where p underflows (-inf and below-floor logits).
    was = torch.ops.gvu_kernels.set_avx512_loops(True)
    try:
        assert cpp_ops.simd_level() == "avx512"
        fast = _row_results()
        assert torch.ops.gvu_kernels.set_avx512_loops(False) and cpp_ops.simd_level() == "avx512-plain"
        plain = _row_results()
    finally:
        torch.ops.gvu_kernels.set_avx512_loops(was)
    for key, (lp, ent, g) in fast.items():
        for a, b in zip((lp, ent, g), plain[key], strict=True):
            assert torch.equal(a.isnan(), b.isnan()), key
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5, equal_nan=True, msg=str(key))
        assert torch.equal(g == 0, plain[key][2] == 0), key
