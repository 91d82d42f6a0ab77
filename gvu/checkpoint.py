"""What a run leaves to resume from and to use (docs/reliability.md).

    checkpoints/step<N>/   DeepSpeed: the TRAINED parameters only (exclude_frozen_parameters), optimizer and scheduler
                           state, and the client state {step, results, rng}; `latest` names the newest whole one
    adapter/               the trained adapter in peft's format (safetensors), replaced atomically at every save

Resume tries `latest`, then older tags, newest first: a checkpoint whose files do not load is reported by name and
skipped; every rank must find a tag whole before any rank loads it, so all ranks resume from the same step.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from gvu import faults
from gvu.metrics import atomic_dir, atomic_write_text
from gvu.models import gathered, save_policy_updates


class ResumeError(RuntimeError):
    """No kept checkpoint loads; the message names the folder and what to do."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, I/O error); the previous one is intact."""


def tags_newest_first(ckpt_dir: Path) -> tuple[list[str], list[str]]:
    """(tags to try in order, notes): `latest` first, then the older step folders; folders newer than `latest` are
    saves that were cut off (their `latest` was never written) and are skipped with a note."""
    steps = sorted((int(p.name[4:]), p.name) for p in ckpt_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit())
    notes, latest = [], None
    if (ckpt_dir / "latest").exists():
        latest = (ckpt_dir / "latest").read_text().strip()
        if latest not in {t for _, t in steps}:
            notes.append(f"{ckpt_dir / 'latest'} names {latest!r}, which is not a checkpoint folder; ignoring it")
            latest = None
    if latest is None:
        return [t for _, t in reversed(steps)], notes
    n = int(latest[4:])
    notes += [f"{ckpt_dir / t} is newer than `latest` (a save cut off): skipped" for s, t in steps if s > n]
    return [latest] + [t for s, t in reversed(steps) if s < n], notes


def tag_problem(folder: Path, world: int = 1) -> str | None:
    """Why checkpoint `folder` cannot be loaded (a missing or unreadable file), or None. Reads every file."""
    files = sorted(folder.glob("*.pt"))
    if not any("model_states" in f.name for f in files):  # mp_rank_00_ (ZeRO-2) or zero_pp_rank_<r>_ (ZeRO-3)
        return f"{folder}: no *model_states.pt"
    optim = [f for f in files if "optim_states" in f.name]
    if len(optim) != world:
        return f"{folder}: {len(optim)} optimizer state files for {world} rank(s) (missing, or saved by another world)"
    for f in files:
        try:
            torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated, zeroed or foreign files fail in many ways (EOFError, pickle, zip errors)
            return f"{f}: does not load ({type(e).__name__}: {str(e)[:120]})"
    return None


def resume(engine, run_dir: Path, world: int, say=print) -> dict | None:
    """Restore the engine from the newest checkpoint every rank can load -> its client state, or None (no
    checkpoint). Damaged ones are reported and skipped; ResumeError if checkpoints exist and none loads."""
    ckpt_dir = run_dir / "checkpoints"
    tags, notes = tags_newest_first(ckpt_dir) if ckpt_dir.exists() else ([], [])
    for n in notes:
        say(f"resume: {n}")
    for tag in tags:
        problem = tag_problem(ckpt_dir / tag, world)
        if not all_ranks_ok(problem is None, world):
            say(f"resume: checkpoint {ckpt_dir / tag} is damaged ({problem or 'on another rank'}); trying an older one")
            continue
        path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load {ckpt_dir / tag} after its files checked whole")
        state = state or {}
        set_rng(state.get("rng"))
        return state
    if tags:
        raise ResumeError(
            f"no checkpoint in {ckpt_dir} loads (tried {tags}); move the folder away to start afresh, or set "
            "train.resume=false, or train.output_dir to a new folder"
        )
    return None


def all_ranks_ok(ok: bool, world: int) -> bool:
    if world == 1:
        return ok
    t = torch.tensor([int(ok)], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def save_checkpoint(engine, run_dir: Path, step: int, state: dict, is_main: bool, keep: int) -> None:
    """checkpoints/step<N> (trained parameters, optimizer, scheduler, `state`, RNG) + the adapter; then older tags
    beyond `keep` are deleted (never the one `latest` names). SaveError when a write fails."""
    tag = f"step{step}"
    ckpt_dir = run_dir / "checkpoints"
    latest = ckpt_dir / "latest"
    if (ckpt_dir / tag).exists() and latest.exists() and latest.read_text().strip() == tag:
        # already saved by an earlier process (every rank reads the same file); within one process the trainer
        # skips a repeated step itself: rank 0 writes `latest` below, after the barrier, racing the others' reads
        return
    client = {"step": step, "rng": rng_state(), **state}
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state=client, save_latest=False, exclude_frozen_parameters=True
        )  # returns after a barrier: every rank's files are written
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # the partial folder; `latest` still names the previous
        free = shutil.disk_usage(ckpt_dir).free / 2**20
        previous = latest.read_text().strip() if latest.exists() else "none"
        raise SaveError(
            f"writing checkpoint {ckpt_dir / tag} failed ({type(e).__name__}: {str(e)[:160]}; {free:.1f} MiB free): "
            f"the previous checkpoint ({previous}) is intact. Free space and rerun the same command to resume"
        ) from e
    faults.point("save", step)
    if is_main:  # `latest` names the tag only now, atomically: a kill before this resumes from the previous tag
        atomic_write_text(latest, tag)
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    try:
        save_adapter(engine.module, run_dir / "adapter", step, is_main)
    except (OSError, RuntimeError) as e:
        raise SaveError(
            f"writing {run_dir / 'adapter'} failed ({type(e).__name__}: {str(e)[:160]}): checkpoint {tag} is written "
            "and intact and adapter/ still holds the previous adapter. Free space and rerun to resume"
        ) from e


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


def rng_state() -> dict:
    """Every global RNG this rank draws from (dropout, init of anything created later)."""
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng(state: dict | None) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
