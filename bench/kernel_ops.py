"""Kernel benchmark: our ops against eager, torch.compile and real peers (TRL, Liger, Cut Cross-Entropy), one run.

    python bench/kernel_ops.py                # CPU full run (~15 min, 2 cores), appends to bench/results/kernel_ops.csv
    python bench/kernel_ops.py --quick        # tiny shapes, a smoke test (tests/bench/test_bench_quick.py)
    python bench/kernel_ops.py --only linear  # only the linear_token_logprobs cases
    python bench/kernel_ops.py --device cuda  # GPU shapes (V = 151936, N = 8192), Triton kernels and GPU peers
    python bench/kernel_ops.py --dry-run      # tiny shapes on CPU, every implementation, 1 repeat (gpu_check.sh)
    python bench/kernel_ops.py --interleave --repeats 5   # ratios robust to a loaded machine (see below)

(Not bench/kernels.py: run as a script, bench/ comes first on sys.path and that name shadowed the `kernels` package.)
The implementations and the check that each peer computes the same quantity are in bench/kernel_peers.py; a peer
that cannot run (not installed, CUDA only, failed) is a row "skipped: <reason>" or "error: ...", never dropped.

token_logprobs, fwd (no grad: old/reference log-probs) and fwd+bwd; linear_token_logprobs fwd and fwd+bwd, twice:
with a trainable head (hidden and weight need gradients) and with a frozen head (only hidden needs a gradient, the
RL/LoRA case; the C++ op then saves E = sum_j p_j W_j so its backward is O(N x D)). Every implementation gets the
same requires_grad pattern. liger_grpo / ours_grpo time the same GRPO loss (kernel_peers.GRPO), fwd+bwd only.

Time: median of repeats after a warmup (CUDA: synchronised). By default each (case, implementation) runs its
repeats back to back in its own process, so load that comes and goes between them skews the ratios; with
--interleave one process per case holds every implementation and each repeat runs every (implementation, mode)
once, the order rotated by one per repeat, so all see the same load (peak memory is then measured in that shared
process, on each one's first timed call: less clean than a fresh process per implementation).
Throughput: token op in GB/s of bytes that must move (fwd reads N*V logits; fwd+bwd reads them twice and writes the
gradient) and, on CPU, its share of the machine's bandwidth measured here (fwd vs a read-only sum, fwd+bwd vs a
copy); linear op in GFLOP/s of useful work (2NDV fwd; fwd+bwd 6NDV trainable, 4NDV frozen, the same count for every
implementation). Peak memory: on CPU every (case, implementation) runs in a fresh subprocess and the resident-set
high-water mark over one call is recorded (reset through /proc/self/clear_refs); on CUDA
torch.cuda.max_memory_allocated over one call. "extra" subtracts the gradients. "x ours" = time of the
implementation / time of ours (for liger_grpo: / ours_grpo).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import kernel_peers  # noqa: E402
from _common import append_csv, machine_info, mem_available_bytes, memory_bandwidth, peak_rss_delta, time_fn  # noqa: E402

import kernels  # noqa: E402  (after the path: this checkout's kernels, not an installed one)

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (dtype, N, V)
TOKEN_FULL = [
    ("fp32", 1024, 32000),
    ("fp32", 8192, 32000),
    ("fp32", 2048, 151936),
    ("bf16", 8192, 32000),
    ("bf16", 2048, 151936),
    ("bf16", 8192, 151936),
]
# (dtype, N, D, V)
LINEAR_FULL = [
    ("fp32", 2048, 1024, 32000),
    ("bf16", 2048, 2048, 32000),
    ("bf16", 2048, 1024, 151936),
    ("bf16", 8192, 2048, 32000),  # a training micro-batch's tokens (e.g. 4 x 2048), where N x V dominates
]
# GPU: the TRL anchor shape [8, 1024, 151936] and Qwen2.5 / Janus-Pro heads (docs/gpu.md).
TOKEN_CUDA = [("bf16", 8192, 151936), ("fp32", 8192, 151936), ("bf16", 16384, 32000)]
LINEAR_CUDA = [("bf16", 8192, 2048, 151936), ("bf16", 8192, 4096, 151936), ("bf16", 8192, 2048, 16384)]
TOKEN_QUICK = [("fp32", 1024, 3000)]
LINEAR_QUICK = [("fp32", 1024, 32, 3000)]
TOKEN_DRY = [("fp32", 512, 300)]  # plumbing only: every implementation once, few torch.compile recompiles
LINEAR_DRY = [("fp32", 512, 16, 300)]


def _est_peak_bytes(op, impl, dtype, n, v, d=0, frozen=False) -> int:
    """Rough peak of fwd+bwd, to skip cases that would not fit next to other jobs on a shared machine."""
    nv, es = n * v, DT[dtype].itemsize
    if op == "linear":
        fused = (4 * n * d if frozen else 3 * v * d) * 4 + 8 * 256 * v
        return nv * (3 * es + 12) if impl == "eager" else fused
    return nv * es * 2 + {"ours": 0, "eager": nv * 12, "compile": nv * 8, "trl": nv * 6}[impl]


# ----------------------------------------------------------------------------------------------------------------
# Worker: one (case, implementation), in a fresh process on CPU


def _modes(frozen: bool, impl: str) -> tuple[str, ...]:
    # Without grad a frozen head's forward is the trainable one's run; loss impls compute gradients in forward.
    return ("fwdbwd",) if frozen or impl in kernel_peers.LOSS_IMPLS else ("fwd", "fwdbwd")


def _peak_and_time(run, device: str) -> tuple[int, float]:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, time.perf_counter() - t0
    t0 = time.perf_counter()
    peak = peak_rss_delta(run)
    return peak, time.perf_counter() - t0


def _prepare(spec: dict) -> tuple[dict, dict]:
    """({"verify": errors} or {"error": why}, {mode: run()}) for one (case, implementation)."""
    torch.manual_seed(0)
    op, impl, dtype, device = spec["op"], spec["impl"], DT[spec["dtype"]], spec["device"]
    n, v, d = spec["n"], spec["v"], spec.get("d", 0)
    # In-process runs (quick, dry, CUDA, interleaved) compile the peers' torch.compile functions for many shapes
    # and grad modes.
    torch._dynamo.config.recompile_limit = 64
    fn = kernel_peers.make(op, impl, device)
    t = torch.randint(0, v, (n,), device=device)
    g = torch.randn(n, device=device)
    if op == "token":
        inputs = [torch.randn(n, v, device=device).mul_(3).to(dtype)]
    else:
        inputs = [torch.randn(n, d, device=device).to(dtype), torch.randn(v, d, device=device).mul_(d**-0.5).to(dtype)]
    # Frozen head: only hidden gets a gradient (the weight is passed without requires_grad, to every impl).
    trainable = [True, not spec.get("frozen", False)]
    try:  # the same quantity as ours, or no timing at all
        out: dict = {"verify": kernel_peers.verify(op, impl, fn, inputs, t, trainable)}
    except AssertionError as e:
        return {"error": f"verification failed: {e}"[:300]}, {}
    out["grad_bytes"] = sum(x.numel() * x.element_size() for x, tr in zip(inputs, trainable, strict=False) if tr)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runs = {}
    for mode in _modes(spec.get("frozen", False), impl):
        if mode == "fwd":
            args = inputs

            def run(args=args):
                with torch.no_grad():
                    fn(*args, t)
                sync()
        else:
            args = [x.detach().requires_grad_(tr) for x, tr in zip(inputs, trainable, strict=False)]

            def run(args=args):
                for x in args:
                    x.grad = None
                res = fn(*args, t)
                (res if impl in kernel_peers.LOSS_IMPLS else res @ g).backward()
                sync()

        runs[mode] = run
    return out, runs


def _first_calls(run, device: str) -> dict:
    """Warmup (and compilation for torch.compile / Liger / CCE), then one timed call with its peak memory."""
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    peak, t_peak = _peak_and_time(run, device)
    return {"first_s": first, "peak": peak, "times": [t_peak]}


def _finish(out: dict, mode: str, r: dict) -> None:
    out[mode] = {"ms": 1e3 * statistics.median(r["times"]), "peak": r["peak"], "first_s": r["first_s"],
                 "grad_bytes": out["grad_bytes"] if mode == "fwdbwd" else 0}  # fmt: skip


def worker(spec: dict) -> dict:
    out, runs = _prepare(spec)
    for mode, run in runs.items():
        r = _first_calls(run, spec["device"])
        # The peak-memory call counts as the first repeat. Short cases get more repeats (~1 s in all): a median
        # of 2-3 sub-ms runs is noise on shared cores.
        reps = max(spec["repeats"], min(50, int(1.0 / max(r["times"][0], 1e-4))))
        r["times"] += [time_fn(run, warmup=0, repeats=1) for _ in range(reps - 1)]
        _finish(out, mode, r)
    return out


def worker_interleaved(spec: dict) -> dict:
    """Every implementation of spec["impls"] for one case, in this process: {impl: worker()'s result}.

    After each (implementation, mode)'s warmup and peak-memory call (not timed: the memory sampler slows it),
    repeat r runs all of them once, starting at the (r mod count)-th, so each sees the same mix of load."""
    res, timed = {}, []
    for impl in spec["impls"]:
        why = spec["skip"].get(impl)
        if why:
            res[impl] = {"error": why}
            continue
        try:
            out, runs = _prepare(dict(spec, impl=impl))
            for mode, run in runs.items():
                timed.append((impl, mode, run, dict(_first_calls(run, spec["device"]), times=[])))
        except Exception as e:  # noqa: BLE001 - reported in the table like a failed subprocess
            out = {"error": f"{type(e).__name__}: {e}"[:200]}
            timed = [x for x in timed if x[0] != impl]
        res[impl] = out
    for r in range(spec["repeats"]):
        k = r % max(len(timed), 1)
        for _, _, run, rec in timed[k:] + timed[:k]:
            rec["times"].append(time_fn(run, warmup=0, repeats=1))
    for impl, mode, _, rec in timed:
        _finish(res[impl], mode, rec)
    return res


def run_worker(spec: dict, timeout: int, in_process: bool = False) -> dict:
    if in_process:  # --quick: no fresh process per case (faster; memory numbers less clean)
        try:
            return worker(spec)
        except Exception as e:  # noqa: BLE001 - reported in the table like a failed subprocess
            return {"error": f"{type(e).__name__}: {e}"[:200]}
    flag = "--worker-interleaved" if "impls" in spec else "--worker"
    cmd = [sys.executable, os.path.abspath(__file__), flag, json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Driver


def _parse_cases(specs: list[str] | None, n_fields: int) -> list[tuple] | None:
    """'bf16:2048:1024:32000' -> ('bf16', 2048, 1024, 32000)."""
    if not specs:
        return None
    out = [tuple(x if i == 0 else int(x) for i, x in enumerate(spec.split(":"))) for spec in specs]
    bad = [spec for spec, c in zip(specs, out, strict=True) if len(c) != n_fields or c[0] not in DT]
    if bad:
        sys.exit(f"bad case {bad}: want dtype:N:V (token) or dtype:N:D:V (linear), dtype in {tuple(DT)}")
    return out


def _cases(args) -> tuple[list, list]:
    token, linear = _parse_cases(args.token, 3), _parse_cases(args.linear, 4)
    if token or linear:
        return token or [], linear or []
    if args.dry_run:
        return TOKEN_DRY, LINEAR_DRY
    if args.quick:
        return TOKEN_QUICK, LINEAR_QUICK
    return (TOKEN_CUDA, LINEAR_CUDA) if args.device == "cuda" else (TOKEN_FULL, LINEAR_FULL)


def _header(args) -> tuple[dict, dict]:
    """(machine info for every row, measured bandwidth or {}) and the printed header lines."""
    info = machine_info()
    info.update(device=args.device, backend=kernels.choose(torch.device(args.device)), peers=_peer_versions(),
                timing="interleaved" if args.interleave else "per-implementation")  # fmt: skip
    bw = {}
    if args.device == "cpu":
        from kernels import cpp_ops

        bw = memory_bandwidth(0.125 if args.quick or args.dry_run else 1.0, repeats=3 if args.quick else 5)
        info.update(simd=cpp_ops.simd_level() if cpp_ops.available() else "n/a", read_gbps=round(bw["read_gbps"], 2),
                    copy_gbps=round(bw["copy_gbps"], 2))  # fmt: skip
        print(f"# {info['cpu']}, {info['cores']} cores, {info['threads']} threads, simd {info['simd']}; memory "
              f"bandwidth read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s (fp32)")  # fmt: skip
    else:
        import triton

        info.update(triton=triton.__version__, cuda_version=torch.version.cuda)
        print(f"# {info['cuda']}, CUDA {torch.version.cuda}, triton {triton.__version__}")
    print(f"# torch {info['torch']}, ours = {info['backend']} backend, peers {info['peers']}, git {info['git_sha']}, "
          f"load avg {info['loadavg']}, {info['timestamp']}")  # fmt: skip
    return info, bw


def _peer_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("trl", "liger-kernel", "cut-cross-entropy"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} missing")
    return " ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 repeats (CI smoke test)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, 1 repeat (scripts/gpu_check.sh)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the tensors live")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "kernel_ops.csv"), help="CSV to append rows to")
    ap.add_argument("--only", choices=("token", "linear"), help="run only this op's cases")
    ap.add_argument("--impls", help="comma-separated subset of implementations (default: all)")
    ap.add_argument("--token", nargs="+", metavar="DT:N:V", help="token cases instead, e.g. bf16:2048:32000")
    ap.add_argument("--linear", nargs="+", metavar="DT:N:D:V", help="linear cases instead, e.g. bf16:2048:1024:32000")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 3, quick 2)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per (case, implementation) subprocess")
    ap.add_argument("--interleave", action="store_true",
                    help="a process per case, repeats rotating over implementations (load-robust ratios)")  # fmt: skip
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-interleaved", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.worker_interleaved:
        print(json.dumps(worker_interleaved(json.loads(args.worker_interleaved))))
        return
    if args.dry_run:
        args.device = "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (use --dry-run for the CPU smoke run)")
    t_start = time.time()
    info, bw = _header(args)
    repeats = args.repeats or (1 if args.dry_run else 2 if args.quick else 5 if args.interleave else 3)
    token_cases, linear_cases = _cases(args)
    pick = set(args.impls.split(",")) if args.impls else None
    # (op, dtype, N, D, V, implementations, frozen head)
    jobs = [("token", dt, n, 0, v, kernel_peers.TOKEN_IMPLS, False) for dt, n, v in token_cases]
    for dt, n, d, v in linear_cases:
        heads = (False,) if args.dry_run else (False, True)
        jobs += [("linear", dt, n, d, v, kernel_peers.LINEAR_IMPLS, fr) for fr in heads]
    if args.only:
        jobs = [j for j in jobs if j[0] == args.only]
    rows, verdicts = [], []
    print(f"{'op':<14}{'dtype':<6}{'N':>6}{'D':>6}{'V':>8} {'mode':<7}{'impl':<11}{'ms':>10}{'thruput':>14}"
          f"{'%bw':>6}{'peak MB':>10}{'x ours':>8}{'err':>9}")  # fmt: skip
    for op, dt, n, d, v, impls, frozen in jobs:
        impls = [i for i in impls if pick is None or i in pick or i.startswith("ours")]
        impls = [i for i in impls if not (frozen and i in kernel_peers.TRAINABLE_ONLY)]
        if args.interleave:
            res = _run_interleaved(args, op, impls, dt, n, d, v, frozen, repeats)
        else:
            res = {impl: _run(args, op, impl, dt, n, d, v, frozen, repeats) for impl in impls}
        label = op + ("-frozen" if frozen else "")
        for mode in ("fwd", "fwdbwd"):
            for impl in impls:
                if mode not in _modes(frozen, impl):
                    continue
                row = _row(info, bw, args, op, dt, n, d, v, mode, impl, frozen, res)
                rows.append(row)
                if not row["ms"]:
                    print(f"{label:<14}{dt:<6}{n:>6}{d:>6}{v:>8} {mode:<7}{impl:<11}  {row['note']}")
                    continue
                print(f"{label:<14}{dt:<6}{n:>6}{d:>6}{v:>8} {mode:<7}{impl:<11}{row['ms']:>10.1f}"
                      f"{row['throughput']:>9.1f} {row['unit']:<5}{row['pct_bw']!s:>5}{row['peak_mb']:>10.0f}"
                      f"{row['ours_x']!s:>8}{row['err']:>9.1e}")  # fmt: skip
        verdicts += _targets(label, dt, n, d, v, res)
    print("\n# targets" + (" (dry run: shapes too small to judge them)" if args.dry_run else ""))
    for line in [] if args.dry_run else verdicts:
        print(line)
    append_csv("kernel_ops", rows, path=args.csv)
    print(f"\n# {len(rows)} rows appended to {os.path.relpath(args.csv)} in {time.time() - t_start:.0f} s; "
          f"load avg at the end {machine_info()['loadavg']}")  # fmt: skip


def _run(args, op, impl, dt, n, d, v, frozen, repeats) -> dict:
    why = kernel_peers.unavailable(impl, args.device)
    if why or (impl == "compile" and args.no_compile):
        return {"error": f"skipped: {why or '--no-compile'}"}
    kind = impl if op == "token" else ("eager" if impl == "eager" else "ours")  # fused peers: ~ours
    need = _est_peak_bytes(op, kind, dt, n, v, d, frozen)
    free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else mem_available_bytes()
    if need > 0.6 * free:
        return {"error": f"skipped: needs ~{need / 2**30:.1f} GiB, more than 60% of the free memory"}
    spec = dict(op=op, impl=impl, dtype=dt, n=n, v=v, d=d, repeats=repeats, frozen=frozen, device=args.device)
    # CPU: a fresh process per case for clean peak-RSS numbers; quick / dry runs and CUDA stay in process.
    return run_worker(spec, args.timeout, in_process=args.quick or args.dry_run or args.device == "cuda")


def _run_interleaved(args, op, impls, dt, n, d, v, frozen, repeats) -> dict:
    skip = {}
    for impl in impls:
        why = kernel_peers.unavailable(impl, args.device)
        if why or (impl == "compile" and args.no_compile):
            skip[impl] = f"skipped: {why or '--no-compile'}"
    # Every implementation's inputs and gradients live in the one process: budget the sum.
    kinds = [impl if op == "token" else ("eager" if impl == "eager" else "ours") for impl in impls if impl not in skip]
    need = sum(_est_peak_bytes(op, k, dt, n, v, d, frozen) for k in kinds)
    free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else mem_available_bytes()
    if need > 0.6 * free:
        return {impl: {"error": f"skipped: all implementations need ~{need / 2**30:.1f} GiB in one process"}
                for impl in impls}  # fmt: skip
    spec = dict(op=op, impls=impls, skip=skip, dtype=dt, n=n, v=v, d=d, repeats=repeats, frozen=frozen,
                device=args.device)  # fmt: skip
    if args.quick or args.dry_run or args.device == "cuda":
        return worker_interleaved(spec)
    res = run_worker(spec, args.timeout * len(impls))
    return res if "error" not in res else {impl: res for impl in impls}


def _row(info, bw, args, op, dt, n, d, v, mode, impl, frozen, res) -> dict:
    r = res[impl].get(mode)
    base = res.get(kernel_peers.BASELINE.get(impl, "ours"), {}).get(mode)
    grads = "logits" if op == "token" else ("hidden" if frozen else "hidden+weight")
    row = dict(info, quick=args.quick or args.dry_run, op=op, dtype=dt, N=n, D=d, V=v, T=kernel_peers.TEMPERATURE,
               mode=mode, impl=impl, ms="", throughput="", unit="", pct_bw="", peak_mb="", extra_mb="", ours_x="",
               err="", grad_err="", note=res[impl].get("error", ""), grads=grads)  # fmt: skip
    if r is None:
        row["note"] = row["note"] or "no result"
        return row
    if op == "token":
        nbytes = n * v * DT[dt].itemsize * (1 if mode == "fwd" else 3)
        thr, unit = nbytes / r["ms"] / 1e6, "GB/s"
        pct = 100 * thr / (bw["read_gbps"] if mode == "fwd" else bw["copy_gbps"]) if bw else None
    else:
        flops = 2 * n * d * v * (1 if mode == "fwd" else (2 if frozen else 3))
        thr, unit, pct = flops / r["ms"] / 1e6, "GFLOP/s", None
    row.update(ms=round(r["ms"], 3), throughput=round(thr, 2), unit=unit, pct_bw="" if pct is None else round(pct, 1),
               peak_mb=round(r["peak"] / 2**20, 1), extra_mb=round((r["peak"] - r["grad_bytes"]) / 2**20, 1),
               ours_x=round(r["ms"] / base["ms"], 2) if base else "", err=res[impl]["verify"]["err"],
               grad_err=res[impl]["verify"]["grad_err"])  # fmt: skip
    return row


def _targets(op, dt, n, d, v, res) -> list[str]:
    """The stated goals, checked on this case's fwd+bwd numbers."""

    def get(impl):
        return res.get(impl, {}).get("fwdbwd")

    ours, eager, comp = get("ours"), get("eager"), get("compile")
    shape = f"{op} {dt} N={n}" + (f" D={d}" if d else "") + f" V={v}"
    out = []
    if ours is None:
        return [f"{shape}: our run failed: {res['ours'].get('error')}"]
    ok = lambda b: "MET" if b else "NOT MET"  # noqa: E731
    if op == "token":
        if comp:
            out.append(f"{shape}: fwd+bwd <= torch.compile ({ours['ms']:.0f} vs {comp['ms']:.0f} ms): "
                       f"{ok(ours['ms'] <= comp['ms'])}")  # fmt: skip
        if eager:
            sp = eager["ms"] / ours["ms"]
            out.append(f"{shape}: fwd+bwd >= 2x eager ({sp:.2f}x): {ok(sp >= 2)}")
            extra_o = ours["peak"] - ours["grad_bytes"]
            extra_e = eager["peak"] - eager["grad_bytes"]
            frac = extra_o / max(extra_e, 1)
            out.append(f"{shape}: extra memory beyond grad < 2% of eager's ({extra_o / 2**20:.0f} MB vs "
                       f"{extra_e / 2**20:.0f} MB = {100 * frac:.1f}%): {ok(frac < 0.02)}")  # fmt: skip
    elif eager:
        frac, slow = ours["peak"] / max(eager["peak"], 1), ours["ms"] / eager["ms"]
        out.append(f"{shape}: peak < 1/8 of eager's ({ours['peak'] / 2**20:.0f} vs {eager['peak'] / 2**20:.0f} MB"
                   f" = 1/{1 / max(frac, 1e-9):.1f}): {ok(frac < 1 / 8)}")  # fmt: skip
        out.append(f"{shape}: time within 1.5x eager ({slow:.2f}x): {ok(slow <= 1.5)}")
        if op == "linear":  # a trainable head: the V x D weight gradient is an output both sides must hold
            floor = ours["grad_bytes"] / max(eager["peak"], 1)
            out.append(f"{shape}:   (the gradients alone, {ours['grad_bytes'] / 2**20:.0f} MB, are 1/{1 / floor:.1f} "
                       f"of eager's peak: the bound any implementation meets at this shape)")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
