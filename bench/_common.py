"""Shared benchmark helpers: machine info, timing (warmup + median), CSV rows, tables, the toy UMM to measure.

Every bench row carries `machine_info()` (CPU, cores, versions, git sha, timestamp, load average) so results from
different machines and commits can sit in one CSV.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> dict:
    """The CPU flags that decide the bf16 GEMM path: native bf16 (avx512_bf16 / amx_bf16) or not, and the SIMD level."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = set(next(x for x in text.splitlines() if x.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    simd = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline" if flags else "unknown"
    return {"bf16_flags": " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags), "cpu_simd": simd}


def git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average() -> str:
    """1/5/15-minute load average: other engineers' jobs share the cores, so every row records it."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict:
    """CPU model, cores, torch threads, torch / transformers versions, git sha, UTC timestamp, load average."""
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "n/a"
    return {
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "loadavg": load_average(),
    }


def time_fn(fn, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _sync() -> None:
    """Wait for queued CUDA work, so a timing covers what the call launched (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_interleaved(fns: dict, warmup: int = 1, repeats: int = 5) -> dict[str, float]:
    """Median seconds per named callable, running them round-robin (A B C A B C ...) so that load from other
    jobs on the shared cores hits baseline and ours alike, instead of whichever ran during a busy spell."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            _sync()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def peak_memory(fn, device: str = "cpu") -> float:
    """Peak memory fn() allocates beyond what is live when it starts, in MiB. CUDA: torch's allocator statistics
    (exact). CPU: the process's resident size sampled every 0.5 ms by a thread (torch's big CPU tensors are mmapped
    and unmapped when freed, so RSS follows them; tiny allocations are below the noise), a lower bound."""
    import threading

    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return max(0, max(peak[0], rss()) - base) / 2**20


def append_csv(name: str, rows: list[dict], path: Path | None = None) -> Path:
    """Append rows to bench/results/<name>.csv (header written once; new columns widen the header)."""
    path = Path(path) if path is not None else RESULTS / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    old: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            if any(k not in old_fields for k in fields):  # rewrite with the wider header, keeping old rows
                old = list(reader)
                fields = old_fields + [k for k in fields if k not in old_fields]
            else:
                fields = old_fields
    mode = "w" if old or not path.exists() else "a"
    with path.open(mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        if mode == "w":
            w.writeheader()
            w.writerows(old)
        w.writerows(rows)
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    """Fixed-width text table of `cols` from `rows` (floats to 4 significant digits)."""

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def toy_checkpoint() -> str | None:
    """The shipped toy UMM checkpoint folder if present, else None (benches then use a random model: same cost)."""
    path = REPO / "gvu" / "assets" / "toy_umm"
    return str(path) if (path / "tokenizer.json").exists() else None


def load_toy(seed: int = 0, **overrides):
    """(adapter, eval-mode model, source label): the shipped checkpoint, or ToyUMM.new_model(seed)."""
    from gvu.toy.backend import ToyUMM

    ckpt = toy_checkpoint()
    if ckpt is not None and not overrides:
        adapter, model = ToyUMM.from_pretrained(ckpt)
        src = "gvu/assets/toy_umm"
    else:
        adapter, model = ToyUMM.new_model(seed=seed, **overrides)
        src = f"random(seed={seed})"
    model.eval()
    return adapter, model, src


JANUS_TINY_SEED = 0


def janus_tiny_words() -> list[str]:
    """Every word of the shapes-world train prompts: the tiny Janus tokenizer's vocabulary (no <unk> in prompts)."""
    from gvu.toy import prompts as WP

    return sorted({w for m in WP.make_prompt_sets(0)[0] for w in m["prompt"].split()})


def load_janus(seed: int = JANUS_TINY_SEED, real_layout: bool = False, shapes: str | None = None, device="cpu",
               dtype=None):  # fmt: skip
    """(JanusUMM adapter, eval-mode JanusForConditionalGeneration, source label) for a tiny random Janus;
    `real_layout` (or shapes="real"): Janus-Pro's image layout with a small body (gvu.testing.real_layout_janus_config);
    shapes="1b": Janus-Pro-1B's published shapes (2.1B parameters, built on `device` in `dtype`, default bf16).

    Built offline the way tests/gvu/test_janus.py does it: gvu.testing.make_tiny_janus writes a random
    checkpoint (tiny_janus_config: Llama d=64 x 2 layers, SigLIP d=32 x 1 on 32 px, VQ with 64 codes on a 4x4 grid)
    with a WordLevel tokenizer over the shapes-world words, then JanusUMM.from_pretrained loads it back (the 1b model
    is used as built: writing 4 GB to load it back tests nothing more).
    """
    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    from gvu.models.janus import JanusUMM
    from gvu.testing import build_janus, make_tiny_janus

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in bench output
    shapes = shapes or ("real" if real_layout else "tiny")
    if shapes == "1b":
        import importlib.util

        dtype = dtype or torch.bfloat16
        # flash-attn when installed (what the Janus configs ask for), else SDPA
        flash = str(device).startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
        attn = "flash_attention_2" if flash else "sdpa"
        adapter, model = build_janus(janus_tiny_words(), seed, "1b", device=device, dtype=dtype, attn=attn)
        adapter.vq.to(device)
        return adapter, model, f"janus_pro_1b_shapes-random(seed={seed}, {str(dtype).replace('torch.', '')}, {attn})"
    with tempfile.TemporaryDirectory(prefix="gvu_bench_janus_") as tmp:
        path = make_tiny_janus(str(Path(tmp) / "ckpt"), janus_tiny_words(), seed=seed, real_layout=shapes == "real")
        adapter, model = JanusUMM.from_pretrained(path)
        # weights may be memory-mapped from the folder about to be deleted: materialise them first
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    model.eval().to(device=device, dtype=dtype or torch.float32)
    adapter.vq.to(device)
    return adapter, model, f"janus_{'real_layout' if shapes == 'real' else 'tiny'}-random(seed={seed})"


def janus_shapes(adapter, model) -> str:
    """One-line description of a Janus model's sizes for bench headers and the README."""
    c = model.config
    t, v = c.text_config, c.vision_config
    n = sum(p.numel() for p in model.parameters())
    return (
        f"vocab {t.vocab_size}, LM d={t.hidden_size} x {t.num_hidden_layers} layers, {adapter.num_codes} codes, "
        f"{adapter.image_len} codes/image, SigLIP d={v.hidden_size} x {v.num_hidden_layers} on {v.image_size} px "
        f"({adapter.und_len} tokens), {n / 1e6:.2f}M params"
    )


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 if unknown): lets a bench skip cases that would not fit next to others."""
    from gvu.models.rows import mem_available

    return mem_available(default=0)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_delta(fn) -> int:
    """Bytes the resident set grew to (its peak, not its final level) above where it stood before `fn()`.

    Resets the kernel's high-water mark (VmHWM) through /proc/self/clear_refs first. Blocks freed earlier but kept
    by the C allocator can be reused without growing the RSS, so run each measured case in a fresh process.
    """
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """STREAM-like GB/s on all torch threads: `read` (sum of an fp32 tensor), `copy` (read + write, y.copy_(x))."""
    import torch

    n = int(gib * 2**30) // 4
    x = torch.ones(n)
    y = torch.empty_like(x)
    t_read = time_fn(lambda: x.sum(), warmup=1, repeats=repeats)
    t_copy = time_fn(lambda: y.copy_(x), warmup=1, repeats=repeats)
    return {"read_gbps": 4 * n / t_read / 1e9, "copy_gbps": 8 * n / t_copy / 1e9}


XOMNI_BENCH_IMAGE_SIZE = 128  # 8 x 8 = 64 codes an image: longer image sequences than the fixture's own 4 x 4


def load_xomni(image_size: int = XOMNI_BENCH_IMAGE_SIZE, reward_path: str = "tokens"):
    """(XOmniUMM, eval-mode XOmniForCausalLM, source label) for the tiny X-Omni of the tests.

    gvu.testing.make_tiny_xomni: the fixture tests/fixtures/xomni_tiny (made by the released code; d=32 x 6 layers,
    text vocab 64, 32 codes) with the tiny offline tokenizer over the shapes-world words, generating image_size px
    = (image_size / 16)^2 codes. reward_path "pixels" adds the vision parts of tests/fixtures/xomni_vision_tiny
    (SigLIP-VQ, FLUX decoder, also made by the released code; needs diffusers).
    """
    import json
    import tempfile

    from transformers.utils import logging as hf_logging

    from gvu.models.xomni.backend import XOmniUMM
    from gvu.testing import make_tiny_xomni

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="gvu_bench_xomni_") as tmp:
        path = make_tiny_xomni(str(Path(tmp) / "ckpt"), image_size, janus_tiny_words())
        if reward_path == "pixels":
            from gvu.models.xomni.tiny import write_tiny_vision

            write_tiny_vision(path, str(Path(tmp) / "flux"), image_size)
            opts = {"image_size": image_size, "reward_path": "pixels", "flux_path": str(Path(tmp) / "flux")}
            (Path(path) / "gvu_xomni.json").write_text(json.dumps(opts))
        adapter, model = XOmniUMM.from_pretrained(path)
        modules = [model]
        if reward_path == "pixels":
            pipe = adapter.codec.decoder.pipe
            modules += [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
        for t in [t for m in modules for t in list(m.parameters()) + list(m.buffers())]:
            t.data = t.data.clone()  # may be memory-mapped from the folder about to be deleted
    return adapter, model.eval(), f"xomni_tiny-fixture({image_size}px,{reward_path})"
