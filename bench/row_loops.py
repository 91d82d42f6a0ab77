"""The C++ row loops' AVX-512 intrinsic exp bodies against the plain (compiler-vectorised) ones, in one process.

    OMP_NUM_THREADS=1 python bench/row_loops.py               # token_logprobs N=2048 V=32000, fp32 and bf16
    OMP_NUM_THREADS=1 python bench/row_loops.py --repeats 21 --n 4096

`torch.ops.gvu_kernels.set_avx512_loops` switches the loops between calls, so the two arms alternate call by call
(A B A B ...) on the same tensors: load from other jobs and the vCPU's minute-to-minute speed hit both alike (runs of
the plain loops in separate processes minutes apart differed by more than the loops do). Forward (no grad: old and
reference log-probs) and forward+backward; medians, the ratio plain / intrinsic (> 1: the intrinsics are faster).
Writes rows to bench/results/row_loops.csv. Needs an x86-64-v4 (AVX-512) CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_csv, cpu_flags, machine_info, time_interleaved  # noqa: E402

import kernels  # noqa: E402
from kernels import cpp_ops  # noqa: E402


def arms(x: torch.Tensor, t: torch.Tensor, mode: str) -> dict:
    """{'intrinsic': fn, 'plain': fn}, each setting the loops, then one token_logprobs call (fwd or fwd+bwd)."""
    xr = x.detach().requires_grad_(mode == "fwdbwd")
    g = torch.randn(x.shape[0])

    def call():
        if mode == "fwd":
            with torch.no_grad():
                kernels.token_logprobs(xr, t)
            return
        xr.grad = None
        (kernels.token_logprobs(xr, t) @ g).backward()

    def arm(on: bool):
        def run():
            torch.ops.gvu_kernels.set_avx512_loops(on)
            call()

        return run

    return {"intrinsic": arm(True), "plain": arm(False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--csv", default=None, help="CSV to append rows to (default bench/results/row_loops.csv)")
    args = ap.parse_args()
    if not cpp_ops.available():
        sys.exit(f"C++ ops not built: {cpp_ops.load_error()}")
    was = torch.ops.gvu_kernels.set_avx512_loops(True)
    if cpp_ops.simd_level() != "avx512":
        torch.ops.gvu_kernels.set_avx512_loops(was)
        sys.exit(f"no AVX-512 intrinsic loops on this CPU (simd level {cpp_ops.simd_level()})")
    info = dict(machine_info(), **cpu_flags())
    print(f"# {info['cpu']}, {info['threads']} threads, git {info['git_sha']}, load {info['loadavg']}")
    rows = []
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(args.n, args.v).mul_(3).to(dt)
        t = torch.randint(0, args.v, (args.n,))
        for mode in ("fwd", "fwdbwd"):
            ms = {k: 1e3 * v for k, v in time_interleaved(arms(x, t, mode), warmup=2, repeats=args.repeats).items()}
            ratio = ms["plain"] / ms["intrinsic"]
            rows.append(dict(info, dtype=str(dt).split(".")[-1], N=args.n, V=args.v, mode=mode,
                             repeats=args.repeats, intrinsic_ms=round(ms["intrinsic"], 2),
                             plain_ms=round(ms["plain"], 2), plain_over_intrinsic=round(ratio, 3)))  # fmt: skip
            print(f"{rows[-1]['dtype']:8s} {mode:7s} intrinsic {ms['intrinsic']:7.1f} ms  plain {ms['plain']:7.1f} ms"
                  f"  plain / intrinsic {ratio:.3f}")  # fmt: skip
    torch.ops.gvu_kernels.set_avx512_loops(was)
    print(f"# rows appended to {append_csv('row_loops', rows, args.csv)}")


if __name__ == "__main__":
    main()
