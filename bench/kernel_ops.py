"""Kernel benchmark on CPU: the C++ ops against eager, torch.compile and a TRL-style loop, in one run.

    python bench/kernel_ops.py                # full run (~10 min on 2 cores), appends to bench/results/kernel_ops.csv
    python bench/kernel_ops.py --quick        # tiny shapes, a smoke test (tests/bench/test_bench_quick.py)
    python bench/kernel_ops.py --only linear  # only the linear_token_logprobs cases

(Not bench/kernels.py: run as a script, bench/ comes first on sys.path and that name shadowed the `kernels` package.)

token_logprobs, fwd (no grad: old/reference log-probs) and fwd+bwd, vs
  eager    torch.log_softmax(x.float() / T, -1).gather(...)
  compile  torch.compile of the same function (compile time excluded: it happens in the warmup)
  trl      TRL selective_log_softmax style: fp32 gather minus a logsumexp looped per sequence (bf16: a per-
           sequence log_softmax), sequences of 512 tokens
linear_token_logprobs vs eager `hidden @ W.T` then the eager log-softmax-gather, fwd and fwd+bwd, twice: with a
trainable head (hidden and weight need gradients; the C++ op recomputes logits in backward) and with a frozen head
(only hidden needs a gradient, the RL/LoRA case; the C++ op's forward also forms E = sum_j p_j W_j per chunk, so its
backward is O(N x D)). Eager gets the same requires_grad pattern, so it skips dW too.

Time: median of repeats after a warmup. Throughput: token op in GB/s of bytes that must move (fwd reads N*V
logits; fwd+bwd reads them twice and writes the gradient) and its share of the machine's bandwidth measured here
(fwd vs a read-only sum, fwd+bwd vs a copy); linear op in GFLOP/s of useful work (2NDV fwd; fwd+bwd 6NDV with a
trainable head, 4NDV frozen; the same count for every implementation although the C++ op does 8NDV trainable, as it
recomputes the logits in backward, and 4NDV frozen, as its forward's extra p @ W GEMM replaces eager's dH GEMM).
Peak memory: every (case, implementation) runs in a fresh subprocess; after the warmup its resident-set
high-water mark is reset (/proc/self/clear_refs) and the peak growth over one call is recorded. It counts
everything the call allocates and touches, outputs and gradients included; "extra" subtracts the gradient.
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

from _common import append_csv, machine_info, mem_available_bytes, memory_bandwidth, peak_rss_delta, time_fn  # noqa: E402

TEMPERATURE = 0.9
SEQ = 512  # tokens per sequence for the TRL-style loop (TRL loops over the batch dimension)
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
TOKEN_QUICK = [("fp32", 64, 3000)]
LINEAR_QUICK = [("fp32", 64, 32, 3000)]


# ----------------------------------------------------------------------------------------------------------------
# Implementations


def eager_logprobs(x, t):
    return torch.log_softmax(x.float() / TEMPERATURE, -1).gather(-1, t[:, None]).squeeze(-1)


def trl_logprobs(x, t):
    """Our take on TRL's selective_log_softmax on (B, L, V) logits, after TRL's `logits / temperature`."""
    x = (x / TEMPERATURE).view(-1, min(SEQ, x.shape[0]), x.shape[-1])
    t = t.view(x.shape[0], -1)
    if x.dtype == torch.float32:
        picked = x.gather(-1, t[..., None]).squeeze(-1)
        lse = torch.stack([torch.logsumexp(seq, dim=-1) for seq in x])
        return (picked - lse).reshape(-1)
    out = [torch.log_softmax(seq, -1).gather(-1, tt[:, None]).squeeze(-1) for seq, tt in zip(x, t, strict=True)]
    return torch.stack(out).float().reshape(-1)


def cpp_logprobs(x, t):
    from kernels import cpp_ops

    return cpp_ops.token_logprobs_cpp(x, t, temperature=TEMPERATURE, ignore_index=-100, return_entropy=False)[0]


def eager_linear(h, w, t):
    return eager_logprobs(h @ w.T, t)


def cpp_linear(h, w, t):
    from kernels import cpp_ops

    return cpp_ops.linear_token_logprobs_cpp(h, w, t, bias=None, temperature=TEMPERATURE, ignore_index=-100,
                                             return_entropy=False, chunk_size=None)[0]  # fmt: skip


TOKEN_IMPLS = ("cpp", "eager", "compile", "trl")
LINEAR_IMPLS = ("cpp", "eager")


def _fn(op: str, impl: str):
    if op == "token":
        base = {"cpp": cpp_logprobs, "eager": eager_logprobs, "compile": eager_logprobs, "trl": trl_logprobs}[impl]
    else:
        base = {"cpp": cpp_linear, "eager": eager_linear}[impl]
    return torch.compile(base, dynamic=False) if impl == "compile" else base


def _est_peak_bytes(op, impl, dtype, n, v, d=0, frozen=False) -> int:
    """Rough peak of fwd+bwd, to skip cases that would not fit next to other jobs on a shared machine."""
    nv, es = n * v, DT[dtype].itemsize
    if op == "linear":
        return {"cpp": (4 * n * d if frozen else 3 * v * d) * 4 + 8 * 256 * v, "eager": nv * (3 * es + 12)}[impl]
    return nv * es * 2 + {"cpp": 0, "eager": nv * 12, "compile": nv * 8, "trl": nv * 6}[impl]


# ----------------------------------------------------------------------------------------------------------------
# Worker: one (case, implementation) in a fresh process


def _modes(frozen: bool) -> tuple[str, ...]:
    return ("fwdbwd",) if frozen else ("fwd", "fwdbwd")  # without grad a frozen head's forward is the same run


def worker(spec: dict) -> dict:
    torch.manual_seed(0)
    op, impl, dtype = spec["op"], spec["impl"], DT[spec["dtype"]]
    n, v, d = spec["n"], spec["v"], spec.get("d", 0)
    fn = _fn(op, impl)
    t = torch.randint(0, v, (n,))
    g = torch.randn(n)
    if op == "token":
        inputs = [torch.randn(n, v).mul_(3).to(dtype)]
    else:
        inputs = [torch.randn(n, d).to(dtype), torch.randn(v, d).mul_(d**-0.5).to(dtype)]
    # Frozen head: only hidden gets a gradient (the weight is passed without requires_grad, to eager as well).
    trainable = [True, not spec.get("frozen", False)]
    grad_bytes = sum(x.numel() * x.element_size() for x, tr in zip(inputs, trainable, strict=False) if tr)
    out: dict = {}
    for mode in _modes(spec.get("frozen", False)):
        if mode == "fwd":
            args = inputs

            def run(args=args):
                with torch.no_grad():
                    fn(*args, t)
        else:
            args = [x.detach().requires_grad_(tr) for x, tr in zip(inputs, trainable, strict=False)]

            def run(args=args):
                for x in args:
                    x.grad = None
                fn(*args, t).backward(g)

        t0 = time.perf_counter()
        run()  # warmup (and compilation for torch.compile)
        first = time.perf_counter() - t0
        for x in args:
            x.grad = None
        t0 = time.perf_counter()
        peak = peak_rss_delta(run)
        t_peak = time.perf_counter() - t0
        # The peak-memory call counts as the first repeat. Short cases get more repeats (~1 s in all): a median
        # of 2-3 sub-ms runs is noise on shared cores.
        reps = max(spec["repeats"], min(50, int(1.0 / max(t_peak, 1e-4))))
        times = [t_peak] + [time_fn(run, warmup=0, repeats=1) for _ in range(reps - 1)]
        ms = 1e3 * statistics.median(times)
        out[mode] = {"ms": ms, "peak": peak, "first_s": first, "grad_bytes": grad_bytes if mode == "fwdbwd" else 0}
    return out


def run_worker(spec: dict, timeout: int, in_process: bool = False) -> dict:
    if in_process:  # --quick: no fresh process per case (faster; memory numbers less clean)
        try:
            return worker(spec)
        except Exception as e:  # noqa: BLE001 - reported in the table like a failed subprocess
            return {"error": f"{type(e).__name__}: {e}"[:200]}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (CI smoke test)")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "kernel_ops.csv"), help="CSV to append rows to")
    ap.add_argument("--only", choices=("token", "linear"), help="run only this op's cases")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 3, quick 2)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per (case, implementation) subprocess")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from kernels import cpp_ops

    if not cpp_ops.available():
        sys.exit(f"C++ ops unavailable: {cpp_ops.load_error()}")
    t_start = time.time()
    info = machine_info()
    bw = memory_bandwidth(0.125 if args.quick else 1.0, repeats=3 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick else 3)
    info.update(simd=cpp_ops.simd_level(), read_gbps=round(bw["read_gbps"], 2), copy_gbps=round(bw["copy_gbps"], 2))
    print(f"# {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
          f"simd {info['simd']}, git {info['git_sha']}, load avg {info['loadavg']}")  # fmt: skip
    print(f"# memory bandwidth: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s (1 GiB fp32)")

    token_cases = TOKEN_QUICK if args.quick else TOKEN_FULL
    linear_cases = LINEAR_QUICK if args.quick else LINEAR_FULL
    # (op, dtype, N, D, V, implementations, frozen head)
    jobs = [("token", dt, n, 0, v, TOKEN_IMPLS, False) for dt, n, v in token_cases]
    for dt, n, d, v in linear_cases:
        jobs += [("linear", dt, n, d, v, LINEAR_IMPLS, False), ("linear", dt, n, d, v, LINEAR_IMPLS, True)]
    if args.only:
        jobs = [j for j in jobs if j[0] == args.only]
    rows, verdicts = [], []
    header = (f"{'op':<14}{'dtype':<6}{'N':>6}{'D':>6}{'V':>8} {'mode':<7}{'impl':<8}{'ms':>10}{'thruput':>14}"
              f"{'%bw':>6}{'peak MB':>10}{'cpp x':>8}")  # fmt: skip
    print(header)
    for op, dt, n, d, v, impls, frozen in jobs:
        res = {}
        grads = "logits" if op == "token" else ("hidden" if frozen else "hidden+weight")
        label = op + ("-frozen" if frozen else "")
        for impl in impls:
            if impl == "compile" and args.no_compile:
                res[impl] = {"error": "skipped (--no-compile)"}
                continue
            need = _est_peak_bytes(op, impl, dt, n, v, d, frozen)
            if need > 0.6 * mem_available_bytes():
                res[impl] = {"error": f"skipped: needs ~{need / 2**30:.1f} GiB, too much next to other jobs"}
                continue
            spec = dict(op=op, impl=impl, dtype=dt, n=n, v=v, d=d, repeats=repeats, frozen=frozen)
            res[impl] = run_worker(spec, args.timeout, in_process=args.quick)
        for mode in _modes(frozen):
            cpp = res["cpp"].get(mode)
            for impl in impls:
                r = res[impl].get(mode)
                row = dict(info, quick=args.quick, op=op, dtype=dt, N=n, D=d, V=v, T=TEMPERATURE, mode=mode,
                           impl=impl, ms="", throughput="", unit="", pct_bw="", peak_mb="", extra_mb="",
                           cpp_speedup="", note=res[impl].get("error", ""), grads=grads)  # fmt: skip
                if r is None:
                    rows.append(row)
                    print(f"{label:<14}{dt:<6}{n:>6}{d:>6}{v:>8} {mode:<7}{impl:<8}  {row['note']}")
                    continue
                if op == "token":
                    nbytes = n * v * DT[dt].itemsize * (1 if mode == "fwd" else 3)
                    thr, unit = nbytes / r["ms"] / 1e6, "GB/s"
                    pct = 100 * thr / (bw["read_gbps"] if mode == "fwd" else bw["copy_gbps"])
                else:
                    flops = 2 * n * d * v * (1 if mode == "fwd" else (2 if frozen else 3))
                    thr, unit, pct = flops / r["ms"] / 1e6, "GFLOP/s", None
                speed = cpp["ms"] and r["ms"] / cpp["ms"] if cpp else None
                row.update(ms=round(r["ms"], 2), throughput=round(thr, 2), unit=unit,
                           pct_bw="" if pct is None else round(pct, 1), peak_mb=round(r["peak"] / 2**20, 1),
                           extra_mb=round((r["peak"] - r["grad_bytes"]) / 2**20, 1),
                           cpp_speedup="" if speed is None else round(speed, 2))  # fmt: skip
                rows.append(row)
                pct_s = "" if pct is None else f"{pct:.0f}"
                sp_s = "" if speed is None else f"{speed:.2f}"
                print(f"{label:<14}{dt:<6}{n:>6}{d:>6}{v:>8} {mode:<7}{impl:<8}{r['ms']:>10.1f}{thr:>9.1f} {unit:<5}"
                      f"{pct_s:>5}{r['peak'] / 2**20:>10.0f}{sp_s:>8}")  # fmt: skip
        verdicts += _targets(label, dt, n, d, v, res)
    print("\n# targets")
    for line in verdicts:
        print(line)
    append_csv("kernel_ops", rows, path=args.csv)
    print(f"\n# {len(rows)} rows appended to {os.path.relpath(args.csv)} in {time.time() - t_start:.0f} s; "
          f"load avg at the end {machine_info()['loadavg']}")  # fmt: skip


def _targets(op, dt, n, d, v, res) -> list[str]:
    """The stated goals, checked on this case's fwd+bwd numbers."""

    def get(impl):
        return res.get(impl, {}).get("fwdbwd")

    cpp, eager, comp = get("cpp"), get("eager"), get("compile")
    shape = f"{op} {dt} N={n}" + (f" D={d}" if d else "") + f" V={v}"
    out = []
    if cpp is None:
        return [f"{shape}: C++ run failed: {res['cpp'].get('error')}"]
    ok = lambda b: "MET" if b else "NOT MET"  # noqa: E731
    if op == "token":
        if comp:
            out.append(f"{shape}: fwd+bwd <= torch.compile ({cpp['ms']:.0f} vs {comp['ms']:.0f} ms): "
                       f"{ok(cpp['ms'] <= comp['ms'])}")  # fmt: skip
        if eager:
            sp = eager["ms"] / cpp["ms"]
            out.append(f"{shape}: fwd+bwd >= 2x eager ({sp:.2f}x): {ok(sp >= 2)}")
            extra_c = cpp["peak"] - cpp["grad_bytes"]
            extra_e = eager["peak"] - eager["grad_bytes"]
            frac = extra_c / max(extra_e, 1)
            out.append(f"{shape}: extra memory beyond grad < 2% of eager's ({extra_c / 2**20:.0f} MB vs "
                       f"{extra_e / 2**20:.0f} MB = {100 * frac:.1f}%): {ok(frac < 0.02)}")  # fmt: skip
    elif eager:
        frac, slow = cpp["peak"] / max(eager["peak"], 1), cpp["ms"] / eager["ms"]
        out.append(f"{shape}: peak < 1/8 of eager's ({cpp['peak'] / 2**20:.0f} vs {eager['peak'] / 2**20:.0f} MB"
                   f" = 1/{1 / max(frac, 1e-9):.1f}): {ok(frac < 1 / 8)}")  # fmt: skip
        out.append(f"{shape}: time within 1.5x eager ({slow:.2f}x): {ok(slow <= 1.5)}")
        if op == "linear":  # a trainable head: the V x D weight gradient is an output both sides must hold
            floor = cpp["grad_bytes"] / max(eager["peak"], 1)
            out.append(f"{shape}:   (the gradients alone, {cpp['grad_bytes'] / 2**20:.0f} MB, are 1/{1 / floor:.1f} "
                       f"of eager's peak: the bound any implementation meets at this shape)")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
