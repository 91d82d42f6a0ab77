"""Registers, spills, shared memory and H100 occupancy of every CUDA variant of the Triton kernels, without a GPU.

    python bench/triton_resources.py                 # sm_80 and sm_90; appends to bench/results/triton_resources.csv
    python bench/triton_resources.py --arch 90 --no-cache

Each launcher's `cuda_variants()` (every dtype x constexpr x block configuration it can pick on CUDA) is compiled to
cubin by Triton for the target (kernels/triton_ops/cuda_variants.py); registers / stack / local bytes come from
`cuobjdump -res-usage` on that cubin, spill bytes from the bundled ptxas `-v`, shared memory from Triton's metadata.
Occupancy is resident warps / 64 on an H100 SM (65536 registers, 228 KiB shared memory, 64 warps, 32 blocks), from
the kernel's registers, shared memory and warps alone: a paper figure, not a measurement.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from _common import append_csv, machine_info, table  # noqa: E402

COLS = ("arch", "variant", "regs", "spill_stores", "spill_loads", "stack_bytes", "smem_bytes", "num_warps", "occupancy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 = A100, 90 = H100)")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "triton_resources.csv"), help="CSV to append to")
    ap.add_argument("--no-cache", action="store_true", help="recompile even if ~/.cache/gvu has these kernel sources")
    ap.add_argument("--modules", nargs="+", default=None, help="kernel files (default all; the dry run: one)")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    import triton

    from kernels.triton_ops.cuda_variants import MODULES, compile_all_subprocess

    t0 = time.time()
    modules = tuple(args.modules or MODULES)
    rows = compile_all_subprocess(tuple(args.arch), use_cache=not args.no_cache, modules=modules)
    info = dict(machine_info(), triton=triton.__version__, target="cuda (offline compile, no GPU)")
    print(f"# {len(rows)} compilations in {time.time() - t0:.0f} s; triton {info['triton']}, git {info['git_sha']}, "
          f"{info['timestamp']}; occupancy on an H100 SM")  # fmt: skip
    ok = [dict(r, occupancy=f"{r['occupancy']:.0%}") for r in rows if "error" not in r]
    print(table(ok, list(COLS)))
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['arch']} {r['variant']}: {r['error']}")
    append_csv("triton_resources", [dict(info, **r) for r in rows], path=args.csv)
    print("\n# summary per kernel and arch: variants, registers (max), spilling variants, occupancy (min-max)")
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["arch"], r["kernel"])].append(r)
    for (arch, kernel), rs in sorted(groups.items()):
        ok = [r for r in rs if "error" not in r]
        spill = [r for r in ok if r["spill_stores"] > 0]
        occ = [r["occupancy"] for r in ok]
        print(f"{arch} {kernel:<28} {len(rs):>4} variants, regs <= {max(r['regs'] for r in ok):>3}, "
              f"{len(spill):>3} spill, occupancy {min(occ):.0%}-{max(occ):.0%}"
              + (f", {len(rs) - len(ok)} FAILED" if len(ok) < len(rs) else ""))  # fmt: skip
        for r in spill:
            print(f"    spills {r['spill_stores']} B: {r['variant']}")
    print(f"\n# {len(rows)} rows appended to {os.path.relpath(args.csv)}")


if __name__ == "__main__":
    main()
