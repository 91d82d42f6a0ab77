"""Smoke tests of the kernel benchmarks: `bench/kernel_ops.py --quick`, `bench/trl_step.py --quick` and
`scripts/gpu_check.sh --dry-run` run and write rows with timings (the dry run: every implementation, peers that
cannot run here as "skipped: ..." rows)."""

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

from kernels import cpp_ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import kernel_peers  # noqa: E402

needs_cpp = pytest.mark.skipif(not cpp_ops.available(), reason=f"C++ ops not built: {cpp_ops.load_error()}")


@needs_cpp
def test_kernel_bench_quick(tmp_path):
    out = tmp_path / "kernel_ops.csv"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "kernel_ops.py"), "--quick", "--impls", "ours,eager,compile,trl",
           "--csv", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "# targets" in p.stdout
    rows = list(csv.DictReader(out.open()))
    assert {(r["op"], r["impl"], r["mode"]) for r in rows} >= {
        ("token", "ours", "fwd"), ("token", "eager", "fwdbwd"), ("token", "trl", "fwd"), ("linear", "ours", "fwdbwd")
    }  # fmt: skip
    # The linear cases run with a trainable head and with a frozen one (only hidden needs a gradient).
    assert {r["grads"] for r in rows if r["op"] == "linear"} == {"hidden+weight", "hidden"}
    timed = [r for r in rows if r["ms"]]
    assert timed and all(float(r["ms"]) > 0 and r["err"] != "" for r in timed)
    assert all(r["cpu"] and r["torch"] and r["git_sha"] and r["backend"] == "cpp" for r in rows)


@needs_cpp
@pytest.mark.skipif(importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None,
                    reason="needs trl and datasets")  # fmt: skip
def test_trl_step_bench_quick(tmp_path):
    out = tmp_path / "trl_step.csv"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "trl_step.py"), "--quick", "--csv", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = list(csv.DictReader(out.open()))
    assert float(row["patched_s"]) > 0 and float(row["trl_s"]) > 0 and float(row["ratio"]) > 0
    assert int(row["kernel_calls"]) >= 2  # the patched steps went through kernels.linear_token_logprobs
    assert len(row["patched_all"].split()) == len(row["trl_all"].split()) == int(row["steps"]) // 2
    assert row["cpu"] and row["loadavg"] and "bf16_flags" in row and row["git_sha"]


@needs_cpp
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, GVU_GPU_CHECK_OUT=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the script's own pytest step sets it through tests/conftest.py
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run"], capture_output=True,
                       text=True, timeout=900, env=env, cwd=ROOT)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    tail = p.stdout.strip().splitlines()
    summary = tail[tail.index(next(x for x in tail if x.startswith("# gpu_check summary"))) :]
    assert len(summary) >= 5 and all(" ok " in line for line in summary[1:-1]), summary
    rows = list(csv.DictReader((tmp_path / "kernel_ops_dry.csv").open()))
    impls = {r["impl"] for r in rows}
    assert impls == set(kernel_peers.TOKEN_IMPLS) | set(kernel_peers.LINEAR_IMPLS)
    for r in rows:  # every peer either timed after its verification, or a row saying why not
        assert (r["ms"] and r["err"]) or r["note"].startswith("skipped:"), r  # a failed check fails here
    assert any(r["impl"] == "liger_flce" and r["note"].startswith("skipped:") for r in rows)
    assert list(tmp_path.glob("triton_resources.csv")) and list(tmp_path.glob("gpu_check_*.log"))


@needs_cpp
def test_row_loops_bench_small(tmp_path):
    # bench/row_loops.py at a tiny shape: both arms run and their ratio lands in the CSV (AVX-512 CPUs only: the
    # script refuses elsewhere with the reason, which is checked too).
    out = tmp_path / "row_loops.csv"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "row_loops.py"), "--n", "64", "--v", "1000", "--repeats", "2",
           "--csv", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    from kernels import cpp_ops

    if cpp_ops.simd_level() not in ("avx512", "avx512-plain"):
        assert p.returncode != 0 and "no AVX-512 intrinsic loops" in p.stderr
        return
    assert p.returncode == 0, p.stderr[-2000:]
    rows = out.read_text().splitlines()
    assert len(rows) == 5 and "plain_over_intrinsic" in rows[0]
