"""Compile every CUDA variant of the Triton kernels to cubin, on any machine (no GPU), and read their resources.

    python -m kernels.triton_ops.cuda_variants --arch 80 90 --json out.json   # --jobs N, --no-cache

The variants are each launcher module's `cuda_variants()`. Per variant and arch: registers, stack and local
bytes from `cuobjdump -res-usage` on the cubin Triton built, spill bytes from the bundled ptxas (`-v`, Triton's
own flags) on its PTX, shared memory (Triton's dynamic + static), and occupancy on an H100 SM. Needs a process
without TRITON_INTERPRET=1 (the interpreter replaces @triton.jit functions): `compile_all_subprocess` runs one.
Results are cached per (triton version, kernel sources, archs) under $GVU_CACHE_DIR or ~/.cache/gvu.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = ("token_logprobs", "linear_token_logprobs", "group_advantages")
HERE = Path(__file__).resolve().parent
# One H100 SXM SM: 64K 32-bit registers (allocated per warp in units of 256), 228 KiB shared memory of which the
# runtime reserves 1 KiB per block, at most 64 resident warps and 32 resident blocks.
H100 = dict(regs=65536, reg_unit=256, smem=228 * 1024, smem_reserved=1024, warps=64, blocks=32)


def _variants(module: str):
    return importlib.import_module(f"kernels.triton_ops.{module}").cuda_variants()


def occupancy(regs: int, smem: int, num_warps: int, sm: dict = H100) -> tuple[float, str]:
    """(resident warps / max warps, the limiting resource) for one kernel on one SM."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / sm["reg_unit"]) * sm["reg_unit"]
    limits = {
        "registers": sm["regs"] // (regs_per_warp * num_warps),
        "shared memory": sm["smem"] // (smem + sm["smem_reserved"]),
        "warps": sm["warps"] // num_warps,
        "blocks": sm["blocks"],
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter] * num_warps / sm["warps"], limiter


def _tool(name: str, arch: int) -> str:
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path if name == "ptxas" else getattr(knobs.nvidia, name).path


def compile_one(job: tuple[str, int, int]) -> dict:
    """Compile variant `index` of `module` for sm_`arch`; returns its resource row (or an error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    module, index, arch = job
    v = _variants(module)[index]
    row = dict(module=module, kernel=v.kernel.__name__, variant=v.name, arch=f"sm_{arch}")
    row["num_warps"] = v.meta["num_warps"]
    printed = io.StringIO()
    try:
        src = triton.compiler.ASTSource(v.kernel, v.signature(), v.constexprs)
        # TRITON_DUMP_PTXAS_LOG (set in main) prints Triton's own `ptxas -v` log when it compiles (not on a cache hit)
        with contextlib.redirect_stdout(printed):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": v.meta["num_warps"]})
    except Exception as e:  # noqa: BLE001 - reported per variant; the test fails on any
        return dict(row, error=f"{type(e).__name__}: {e}"[:500])
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = Path(d, "k.cubin"), Path(d, "k.ptx")
        cubin.write_bytes(k.asm["cubin"])
        ptx.write_text(k.asm["ptx"])
        res = subprocess.run([_tool("cuobjdump", arch), "-res-usage", str(cubin)], capture_output=True, text=True)
        usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res.stdout))
        log = printed.getvalue()
        if int(usage.get("STACK", 0)) == 0:  # spills live in the stack frame: none without one
            log = "0 bytes spill stores, 0 bytes spill loads"
        elif "spill stores" not in log:  # a Triton cache hit: no log, so run its ptxas again on the PTX
            cmd = [_tool("ptxas", arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(arch)}", str(ptx), "-o", str(Path(d, "o.cubin"))]  # fmt: skip
            log = subprocess.run(cmd, capture_output=True, text=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs, smem = int(usage.get("REG", 0)), k.metadata.shared + int(usage.get("SHARED", 0))
    occ, limiter = occupancy(regs, smem, v.meta["num_warps"])
    return dict(
        row, cubin_bytes=len(k.asm["cubin"]), regs=regs, stack_bytes=int(usage.get("STACK", 0)),
        local_bytes=int(usage.get("LOCAL", 0)), spill_stores=int(spills[1]) if spills else -1,
        spill_loads=int(spills[2]) if spills else -1, smem_bytes=smem, occupancy=round(occ, 4), limiter=limiter,
    )  # fmt: skip


def _cache_key(archs, modules) -> str:
    import triton

    h = hashlib.sha256(f"{triton.__version__} {sorted(archs)} {list(modules)}".encode())
    for p in sorted(HERE.glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def _cache_dir() -> Path:
    return Path(os.environ.get("GVU_CACHE_DIR", Path.home() / ".cache" / "gvu")) / "triton_variants"


def compile_all(archs=(80, 90), jobs: int | None = None, use_cache: bool = True, modules=MODULES) -> list[dict]:
    """Resource rows for every variant x arch, from the cache when the kernel sources have not changed."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: compile in a fresh process (compile_all_subprocess)")
    cache = _cache_dir() / f"{_cache_key(archs, modules)}.json"
    if use_cache and cache.exists():
        return json.loads(cache.read_text())
    work = [(m, i, a) for a in archs for m in modules for i in range(len(_variants(m)))]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        rows = list(pool.map(compile_one, work, chunksize=4))
    if not any("error" in r for r in rows):  # never cache a failure: the next run retries it
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rows))
    return rows


def compile_all_subprocess(archs=(80, 90), timeout: int = 3600, use_cache: bool = True, modules=MODULES) -> list[dict]:
    """compile_all in a child process without TRITON_INTERPRET (callable from the interpreted test suite)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(HERE.parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    with tempfile.TemporaryDirectory() as d:
        out = Path(d, "rows.json")
        cmd = [sys.executable, "-m", "kernels.triton_ops.cuda_variants", "--json", str(out), "--arch", *map(str, archs)]
        cmd += ["--modules", *modules]
        if not use_cache:
            cmd.append("--no-cache")
        p = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 = A100, 90 = H100)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    ap.add_argument("--no-cache", action="store_true", help="recompile even when the cache has these sources")
    ap.add_argument("--modules", nargs="+", choices=MODULES, default=list(MODULES), help="kernel files to compile")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")  # read by compile_one in the pool's processes
    rows = compile_all(tuple(args.arch), args.jobs, use_cache=not args.no_cache, modules=tuple(args.modules))
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    bad = [r for r in rows if "error" in r]
    print(f"{len(rows)} variant compilations, {len(bad)} failed")
    for r in bad:
        print(f"  {r['arch']} {r['variant']}: {r['error']}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
