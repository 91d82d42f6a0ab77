"""Run outputs: metrics (jsonl + TensorBoard), progress bars, phase timers, atomic file writes, sample grids and
curves."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_dir(path: str | Path):
    """Context manager yielding a temp folder that replaces `path` only once the block succeeds."""

    @contextlib.contextmanager
    def _cm():
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    return _cm()


def progress(iterable, desc: str, enabled: bool = True, total: int | None = None):
    """`iterable` with progress (count, rate, ETA) on stderr when `enabled` (rank 0): a tqdm bar on a terminal,
    else (logs, CI) one plain line at most every 30 s and at the end."""
    if not enabled:
        yield from iterable
        return
    import sys

    total = (len(iterable) if total is None and hasattr(iterable, "__len__") else total) or 0
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, desc=desc, total=total, dynamic_ncols=True)
        return
    t0 = last = time.perf_counter()
    done = 0
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= 30 or done == total:
            last, rate = now, done / max(now - t0, 1e-9)
            eta = f", ETA {(total - done) / rate:.0f} s" if total else ""
            print(f"{desc}: {done}/{total} ({rate:.2f}/s{eta})", file=sys.stderr)


class PhaseTimer:
    """Wall time per named phase of a step: `with timer("rollout"): ...`; `pop()` returns and resets them."""

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)
        self.step = 0  # the step being run (1-based), for gvu.faults

    @contextlib.contextmanager
    def __call__(self, name: str):
        from torch.profiler import record_function

        from gvu import faults

        faults.point(name, self.step)
        t0 = time.perf_counter()
        try:
            with record_function(f"gvu/{name}"):  # the phase as a named span in --train.profile traces
                yield
        finally:
            self.times[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.times = dict(self.times), defaultdict(float)
        return out


class MetricsWriter:
    """Append-only metrics.jsonl (one line per step, flushed) + TensorBoard scalars. Rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            # lines written after the checkpoint we resume from (all of them on a fresh start) will be redone
            keep = [
                ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step
            ]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {
            "step": step,
            **{k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in values.items()},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, float):
                self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def save_grid(path: Path, images: np.ndarray, captions: list[str], cols: int) -> None:
    """images uint8 (N, H, W, 3), one caption per image written under it -> PNG (atomic)."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = images.shape
    cap_h = 28
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (w + 8), rows * (h + cap_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i in range(n):
        x, y = (i % cols) * (w + 8) + 4, (i // cols) * (h + cap_h + 8) + 4
        sheet.paste(Image.fromarray(images[i]), (x, y))
        text = captions[i]
        # wrap long prompts over two lines at a word boundary near the middle
        if draw.textlength(text, font=font) > w:
            words = text.split()
            half = len(words) // 2
            text = " ".join(words[:half]) + "\n" + " ".join(words[half:])
        draw.multiline_text((x, y + h + 2), text, fill="black", font=font, spacing=1)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(metrics_path: Path, out: Path, before: float | None, after: float | None) -> None:
    """Reward and evaluator-score curves over training steps (+ held-out before/after) -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "reward/mean" in r]
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])

    def smooth(key):
        v = np.array([r.get(key, np.nan) for r in rows], dtype=float)
        k = max(1, len(v) // 25)
        return np.convolve(v, np.ones(k) / k, mode="valid"), steps[k - 1 :]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, key, title in (
        (axes[0], "reward/mean", "intrinsic reward (rollouts)"),
        (axes[1], "train/score", "evaluator score of rollouts (train prompts)"),
        (axes[2], "kl", "KL to reference"),
    ):
        v, s = smooth(key)
        ax.plot(s, v)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if before is not None and after is not None:
        axes[1].axhline(before, color="gray", ls="--", label=f"held-out before {before:.3f}")
        axes[1].axhline(after, color="green", ls="--", label=f"held-out after {after:.3f}")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
