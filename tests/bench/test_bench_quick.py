"""Smoke test of the kernel benchmark: `python bench/kernel_ops.py --quick` runs and writes rows with timings."""

import csv
import os
import subprocess
import sys

import pytest

from kernels import cpp_ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not cpp_ops.available(), reason=f"C++ ops not built: {cpp_ops.load_error()}")
def test_kernel_bench_quick(tmp_path):
    out = tmp_path / "kernel_ops.csv"
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "kernel_ops.py"), "--quick", "--csv", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "# targets" in p.stdout
    rows = list(csv.DictReader(out.open()))
    assert {(r["op"], r["impl"], r["mode"]) for r in rows} >= {
        ("token", "cpp", "fwd"), ("token", "eager", "fwdbwd"), ("token", "trl", "fwd"), ("linear", "cpp", "fwdbwd")
    }  # fmt: skip
    # The linear cases run with a trainable head and with a frozen one (only hidden needs a gradient).
    assert {r["grads"] for r in rows if r["op"] == "linear"} == {"hidden+weight", "hidden"}
    timed = [r for r in rows if r["ms"]]
    assert timed and all(float(r["ms"]) > 0 for r in timed)
    assert all(r["cpu"] and r["torch"] and r["git_sha"] for r in rows)
