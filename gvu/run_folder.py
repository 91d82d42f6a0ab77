"""The output folder belongs to one run: an exclusive lock while a trainer writes to it, and the saved config that a
resumed run is compared with (docs/reliability.md)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import yaml

from gvu.config import Config, ConfigError

LOCK_FILE = ".gvu.lock"
# sections whose change alters what is trained; a resume refuses them unless train.allow_changes names them
SHAPING = ("model", "lora", "data", "sampling", "grpo", "joint", "optim")


class FolderLocked(RuntimeError):
    """Another live trainer holds the output folder."""


class RunLock:
    """fcntl lock on output_dir/.gvu.lock, held for the process's life (the kernel drops it if the process dies, so a
    crashed run never leaves a stale lock); the file names the holder (pid, host, start) for the refusal."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "an unknown process"
            os.close(self.fd)
            raise FolderLocked(
                f"train.output_dir={str(run_dir)!r} is in use by {holder}: a second trainer would overwrite its "
                "checkpoints. Wait for it or stop it, or set train.output_dir to another folder"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps(me).encode())

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def config_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """[(section.field, saved value, new value)] for every field that differs."""
    out = []
    for section in sorted(set(saved) | set(new)):
        a, b = saved.get(section) or {}, new.get(section) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append((f"{section}.{k}", a.get(k), b.get(k)))
    return out


def check_resume_config(cfg: Config, run_dir: Path) -> list[tuple[str, object, object]]:
    """The changes of cfg against run_dir/config.yaml (the config the run started with). ConfigError if a change to a
    training-shaping section (SHAPING) is not allowed by train.allow_changes (field or section names)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return []
    saved = yaml.safe_load(saved_path.read_text()) or {}
    # a section added since the run started (e.g. joint) ran at its defaults: compare against those
    saved = {**{k: v for k, v in Config().to_dict().items() if k not in saved}, **saved}
    changes = config_changes(saved, cfg.to_dict())
    allowed = set(cfg.train.allow_changes)
    refused = [
        (f, a, b) for f, a, b in changes
        if f.split(".")[0] in SHAPING and f not in allowed and f.split(".")[0] not in allowed
    ]  # fmt: skip
    if refused:
        listed = "; ".join(f"{f}: {a!r} -> {b!r}" for f, a, b in refused)
        raise ConfigError(
            f"resuming {run_dir} with a changed training config ({listed}). Allow it with "
            f"--train.allow_changes=[{','.join(f for f, _, _ in refused)}], or set train.resume=false or another "
            "train.output_dir to start afresh"
        )
    return changes


def record_config(cfg: Config, run_dir: Path, changes: list, step: int) -> Path | None:
    """Write config.yaml on a fresh start (step 0: no checkpoint depends on an older one); on a resume with changes,
    config.resume-step<N>.yaml beside it (the original is never overwritten). Returns the path written, if any."""
    first = run_dir / "config.yaml"
    if step == 0 or not first.exists():
        cfg.save(first)
        return first
    if not changes:
        return None
    path = run_dir / f"config.resume-step{step}.yaml"
    cfg.save(path)
    return path
