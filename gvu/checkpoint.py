"""What a run leaves to resume from and to use: DeepSpeed checkpoints (optimizer, scheduler, step, results) under
output_dir/checkpoints, and the trained adapter in peft's format (safetensors) under output_dir/adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

from gvu.metrics import atomic_dir, atomic_write_text
from gvu.models import gathered, save_policy_updates


def resume_tag(run_dir: Path) -> str | None:
    """The tag of the newest complete checkpoint in run_dir, or None."""
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.exists() else None


def load_checkpoint(engine, run_dir: Path, tag: str) -> dict:
    """Restore the engine from checkpoints/<tag>; returns the client state saved with it ({} if none)."""
    _, state = engine.load_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    return state or {}


def save_checkpoint(engine, run_dir: Path, step: int, state: dict, is_main: bool, keep: int) -> None:
    """DeepSpeed checkpoint checkpoints/step<N> (resumable: optimizer, scheduler, `state`) + the adapter."""
    tag = f"step{step}"
    ckpt_dir = run_dir / "checkpoints"
    if (ckpt_dir / tag).exists():
        return
    # DeepSpeed writes `latest` only after the tag's files, so a kill mid-save resumes from the previous tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, **state})
    if is_main:
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    save_adapter(engine.module, run_dir / "adapter", step, is_main)


def save_adapter(model, folder: Path, step: int, is_main: bool) -> None:
    """peft's adapter files (+ policy_updates.safetensors, gvu.models.save_policy_updates) into `folder`,
    replaced atomically. Every rank must call it: ZeRO-3 partitions even the LoRA weights."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with gathered(*trainable):
        if is_main:
            with atomic_dir(folder) as tmp:
                model.save_pretrained(str(tmp), safe_serialization=True)
                save_policy_updates(model, tmp)
                atomic_write_text(tmp / "step.txt", f"{step}\n")
