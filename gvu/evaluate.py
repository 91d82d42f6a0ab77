"""Held-out evaluation: the evaluator chosen by the prompt source, run sharded over ranks, summaries and tables.

    evaluator_for(cfg)   data.prompts=shapes -> gvu.toy.evaluator.ShapesEvaluator (the world's exact evaluator)
                         a prompt file + data.eval_file -> RewardEvaluator (the base's own reward on held-out prompts)
                         a prompt file alone -> None (score with `python -m gvu.geneval` and the GenEval evaluator)

Every evaluator returns {"generation": generation_summary(...), ...}: per-prompt values (each the mean over
`train.eval_samples` samples), per-tag means, overall = mean of the tag means, standard errors clustered by prompt
(samples of one prompt are not independent). Seeds are fixed, so before / after are paired prompt by prompt.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from gvu.metrics import progress, save_grid
from gvu.models import adapter_disabled
from gvu.rewards import intrinsic_reward


class Evaluator(Protocol):
    """Held-out evaluation of a policy. `evaluate` runs on every rank (ZeRO-3 needs all ranks in each forward)
    and returns the merged result on every rank."""

    name: str

    def evaluate(self, backend, model, metas: list[dict], cfg, rank: int, world: int) -> dict: ...

    def summary(self, label: str, result: dict) -> str: ...

    def rollout_metrics(self, metas: list[dict], images: np.ndarray, group_size: int) -> dict[str, float]:
        """Free per-step metrics of the training rollouts (images (B*G, H, W, 3) of `metas`); {} if none."""
        ...


def evaluator_for(cfg) -> Evaluator | None:
    """The held-out evaluator of a run, chosen by its prompt source (module docstring)."""
    if cfg.data.prompts == "shapes":
        from gvu.toy.evaluator import ShapesEvaluator

        return ShapesEvaluator()
    return RewardEvaluator() if cfg.data.eval_file else None


# ----------------------------------------------------------------------------------------------- summaries


def tag_stats(tags: list[str], per_prompt: list[float]) -> tuple[dict, dict, float, float]:
    """Per-tag mean and clustered stderr of per-prompt values (tags in first-seen order); overall = mean of
    tag means, its stderr from the tags' (independent prompts)."""
    by = defaultdict(list)
    for t, a in zip(tags, per_prompt, strict=True):
        by[t].append(a)
    mean, se = {}, {}
    for t, v in by.items():
        v = np.asarray(v, dtype=float)
        mean[t] = float(v.mean())
        se[t] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    overall = float(np.mean(list(mean.values())))
    overall_se = float(math.sqrt(sum(s * s for s in se.values())) / len(se))
    return mean, se, overall, overall_se


def generation_summary(metas: list[dict], per_prompt: list[float], samples_per_prompt: int) -> dict:
    """Per-prompt values (one per meta) -> {per_tag, per_tag_stderr, overall, stderr, n, n_prompts, prompts, tags,
    per_prompt}."""
    tags = [m.get("tag", "all") for m in metas]
    mean, se, overall, overall_se = tag_stats(tags, per_prompt)
    return {
        "per_tag": mean,
        "per_tag_stderr": se,
        "overall": overall,
        "stderr": overall_se,
        "n": len(metas) * samples_per_prompt,
        "n_prompts": len(metas),
        "prompts": [m["prompt"] for m in metas],
        "tags": tags,
        "per_prompt": per_prompt,
    }


def _fmt(v: float | None, se: float | None) -> str:
    return "-" if v is None else f"{v:.3f} +- {se:.3f}"


def format_table(before: dict, after: dict | None = None) -> str:
    """Per-tag table of generation summaries: before, after, delta and its z.

    When both runs scored the same prompts, the delta's stderr is paired (per-prompt differences, clustered by
    prompt, per tag); otherwise the two stderrs are combined as independent.
    """
    tags = list(dict.fromkeys(list(before["per_tag"]) + list(after["per_tag"] if after else [])))
    if after is None:
        lines = [f"| {'tag':<15} | {'score':>15} |", f"|{'-' * 17}|{'-' * 17}|"]
        for t in tags:
            lines.append(f"| {t:<15} | {_fmt(before['per_tag'][t], before['per_tag_stderr'][t]):>15} |")
        lines.append(f"| {'overall':<15} | {_fmt(before['overall'], before['stderr']):>15} |")
        return "\n".join(lines)
    paired = before.get("prompts") == after.get("prompts") and all(
        "per_prompt" in x and "tags" in x for x in (before, after)
    )
    dse: dict = {}
    if paired:
        d = [a - b for a, b in zip(after["per_prompt"], before["per_prompt"], strict=True)]
        _, dse, _, d_overall_se = tag_stats(before["tags"], d)
    lines = [
        f"| {'tag':<15} | {'before':>15} | {'after':>15} | {'delta':>8} | {'z':>5} |",
        f"|{'-' * 17}|{'-' * 17}|{'-' * 17}|{'-' * 10}|{'-' * 7}|",
    ]
    rows = [(t, *(x[k].get(t) for x in (before, after) for k in ("per_tag", "per_tag_stderr"))) for t in tags]
    rows.append(("overall", before["overall"], before["stderr"], after["overall"], after["stderr"]))
    for t, b, bs, a, as_ in rows:
        if a is None or b is None:
            lines.append(f"| {t:<15} | {_fmt(b, bs):>15} | {_fmt(a, as_):>15} | {'-':>8} | {'-':>5} |")
            continue
        se = (d_overall_se if t == "overall" else dse.get(t)) if paired else math.sqrt(bs * bs + as_ * as_)
        z = (a - b) / se if se else (float("inf") if a != b else 0.0)
        lines.append(f"| {t:<15} | {_fmt(b, bs):>15} | {_fmt(a, as_):>15} | {a - b:>+8.3f} | {z:>5.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- sharding


def gather_per_prompt(shard_values: list, n: int, world: int) -> list:
    """Each rank's values for its shard metas[rank::world] -> the values of all n prompts in order (all ranks)."""
    if world == 1:
        return list(shard_values)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, list(shard_values))
    return [parts[i % world][i // world] for i in range(n)]


@torch.no_grad()
def per_prompt_scores(backend, model, metas, samples: int, sampling, score_images, seed: int, batch_size=32, bar=False):
    """Mean of `score_images(chunk_metas, images (B*G, H, W, 3), prompts)` -> (B*G,) over each prompt's samples:
    one float per meta. `batch_size` prompts go through one rollout (batch_size * samples rows)."""
    gen = torch.Generator().manual_seed(seed)
    was_training = getattr(model, "training", False)
    model.eval()
    out = []
    for i in progress(range(0, len(metas), batch_size), f"eval (batches of {batch_size} prompts)", enabled=bar):
        chunk = metas[i : i + batch_size]
        prompts = backend.tokenize_prompts([m["prompt"] for m in chunk], device=_device(model))
        images = backend.decode(backend.generate(model, prompts, samples, sampling, generator=gen))
        values = np.asarray(score_images(chunk, images, prompts), dtype=float).reshape(len(chunk), samples)
        out += values.mean(1).tolist()
    if was_training:
        model.train()
    return out


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class RewardEvaluator:
    """The model's own intrinsic reward on held-out prompts (a prompt file's data.eval_file). The judge is always
    the base's understanding (adapter disabled), so before and after are scored by the same teacher."""

    name = "reward"

    def evaluate(self, backend, model, metas, cfg, rank, world) -> dict:
        def score(chunk, images, prompts):
            with adapter_disabled(model):
                r = intrinsic_reward(backend, model, images, prompts.repeat_interleave(cfg.train.eval_samples))
            return r.cpu().numpy()

        shard = metas[rank::world]
        values = per_prompt_scores(
            backend, model, shard, cfg.train.eval_samples, cfg.sampling, score, seed=cfg.train.seed * 7919 + rank,
            bar=rank == 0,
        )  # fmt: skip
        per_prompt = gather_per_prompt(values, len(metas), world)
        return {"generation": generation_summary(metas, per_prompt, cfg.train.eval_samples)}

    def summary(self, label: str, result: dict) -> str:
        g = result["generation"]
        return f"[{label}] held-out reward (base teacher) {g['overall']:.4f} +- {g['stderr']:.4f} ({g['n']} images)"

    def rollout_metrics(self, metas, images, group_size) -> dict[str, float]:
        return {}


def write_samples(backend, model, metas, cfg, path: Path, is_main: bool) -> None:
    """A fixed grid: train.sample_grid_prompts held-out prompts x 4 samples, seeded, prompt under each image."""
    n = min(cfg.train.sample_grid_prompts, len(metas))
    if n == 0:
        return
    chosen = metas[:: max(1, len(metas) // n)][:n]
    prompts = backend.tokenize_prompts([m["prompt"] for m in chosen], device=_device(model))
    gen = torch.Generator().manual_seed(cfg.train.seed + 7)
    with torch.no_grad():
        tokens = backend.generate(model, prompts, 4, cfg.sampling, generator=gen)
    if is_main:
        save_grid(path, backend.decode(tokens), [m["prompt"] for m in chosen for _ in range(4)], cols=8)
