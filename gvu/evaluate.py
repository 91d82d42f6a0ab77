"""Evaluation in the shapes world: GenEval-style generation scores and understanding checks.

generation_scores: rollout -> pixels -> read back -> exact evaluator; per-tag accuracy, overall = mean over
    tags, standard errors clustered by prompt (samples of one prompt are not independent).
understanding_scores: (i) greedy caption accuracy (the caption, parsed, is true for the scene) and (ii) for
    each word type (count, color, position, shape), how often the intrinsic reward of the true prompt beats a
    one-word-perturbed false prompt on the same image. Gate RL on (ii): a reward blind to a word type gets
    hacked on it (DESIGN.md, prototype facts).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np
import torch

from gvu import shapes_world as W
from gvu.reward import intrinsic_reward
from gvu.rollout import SamplingConfig


def _tag_stats(tags: list[str], per_prompt: list[float]) -> tuple[dict, dict, float, float]:
    """Per-tag mean and clustered stderr of per-prompt accuracies; overall = mean of tag means."""
    by = defaultdict(list)
    for t, a in zip(tags, per_prompt, strict=True):
        by[t].append(a)
    mean, se = {}, {}
    for t in W.TAGS:
        if t in by:
            v = np.asarray(by[t])
            mean[t] = float(v.mean())
            se[t] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    overall = float(np.mean(list(mean.values())))
    overall_se = float(math.sqrt(sum(s * s for s in se.values())) / len(se))
    return mean, se, overall, overall_se


@torch.no_grad()
def generation_scores(
    adapter,
    model,
    metas: list[dict],
    samples_per_prompt: int = 16,
    sampling: SamplingConfig | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """GenEval-style scores of `samples_per_prompt` rollouts per prompt.

    -> {per_tag, per_tag_stderr, overall, stderr, n (images), n_prompts, prompts, tags, per_prompt (accuracies)}.
    `batch_size` prompts go through one rollout (batch_size * samples_per_prompt rows).
    """
    sampling = sampling or SamplingConfig()
    gen = torch.Generator().manual_seed(seed)
    was_training = getattr(model, "training", False)
    model.eval()
    per_prompt = []
    for i in range(0, len(metas), batch_size):
        chunk = metas[i : i + batch_size]
        prompts = adapter.tokenize_prompts([m["prompt"] for m in chunk])
        codes = adapter.generate(model, prompts, samples_per_prompt, sampling, generator=gen)
        pixels = adapter.decode(codes)
        read = W.read_image(pixels).reshape(len(chunk), samples_per_prompt, -1)
        for m, imgs in zip(chunk, read, strict=True):
            per_prompt.append(float(np.mean([W.evaluate(m, c) for c in imgs])))
    if was_training:
        model.train()
    return generation_summary(metas, per_prompt, samples_per_prompt)


def generation_summary(metas: list[dict], per_prompt: list[float], samples_per_prompt: int) -> dict:
    """Per-prompt accuracies (one per meta) -> the generation_scores dict (per-tag, overall, clustered stderr)."""
    mean, se, overall, overall_se = _tag_stats([m["tag"] for m in metas], per_prompt)
    return {
        "per_tag": mean,
        "per_tag_stderr": se,
        "overall": overall,
        "stderr": overall_se,
        "n": len(metas) * samples_per_prompt,
        "n_prompts": len(metas),
        "prompts": [m["prompt"] for m in metas],
        "tags": [m["tag"] for m in metas],
        "per_prompt": per_prompt,
    }


@torch.no_grad()
def understanding_scores(adapter, model, metas: list[dict], seed: int = 0, batch_size: int = 128) -> dict:
    """Caption accuracy and true-vs-perturbed reward ranking on scenes sampled consistent with `metas`.

    -> {caption_acc, ranking: {kind: acc}, ranking_n: {kind: n}, n_scenes, examples: a few (prompt, caption)}.
    Ties in the ranking count one half. Position perturbations use the opposite relation (always false);
    scenes hold only the stated relation (sample_scene's `unambiguous`).
    """
    rng = random.Random(seed)
    was_training = getattr(model, "training", False)
    model.eval()
    scenes = np.stack([W.sample_scene(m, rng) for m in metas])
    pixels = W.render(scenes)
    captions = []
    for i in range(0, len(metas), batch_size):
        captions += adapter.caption(model, pixels[i : i + batch_size])
    ok = []
    for cap, sc in zip(captions, scenes, strict=True):
        parsed = W.parse_prompt(cap)
        ok.append(parsed is not None and W.evaluate(parsed, sc))

    ranking, ranking_n = {}, {}
    for kind in W.PERTURB_KINDS:
        rows, true_p, false_p = [], [], []
        for j, (m, sc) in enumerate(zip(metas, scenes, strict=True)):
            q = W.perturb(m, kind, rng, image=sc)
            if q is not None:
                rows.append(j)
                true_p.append(m["prompt"])
                false_p.append(q["prompt"])
        if not rows:
            continue
        wins = []
        for i in range(0, len(rows), batch_size):
            idx = rows[i : i + batch_size]
            img = torch.from_numpy(np.concatenate([pixels[idx], pixels[idx]]))
            r = intrinsic_reward(
                adapter, model, img, adapter.tokenize_prompts(true_p[i : i + batch_size] + false_p[i : i + batch_size])
            )
            rt, rf = r[: len(idx)], r[len(idx) :]
            wins += ((rt > rf).float() + 0.5 * (rt == rf).float()).tolist()
        ranking[kind] = float(np.mean(wins))
        ranking_n[kind] = len(wins)
    if was_training:
        model.train()
    return {
        "caption_acc": float(np.mean(ok)),
        "ranking": ranking,
        "ranking_n": ranking_n,
        "n_scenes": len(metas),
        "examples": [(m["prompt"], c) for m, c in list(zip(metas, captions, strict=True))[:: max(1, len(metas) // 8)]],
    }


def _fmt(v: float | None, se: float | None) -> str:
    return "-" if v is None else f"{v:.3f} +- {se:.3f}"


def format_table(before: dict, after: dict | None = None) -> str:
    """Per-tag table of generation scores (generation_scores dicts): before, after, delta and its z.

    When both runs scored the same prompts, the delta's stderr is paired (per-prompt differences, clustered by
    prompt, per tag); otherwise the two stderrs are combined as independent.
    """
    tags = [t for t in W.TAGS if t in before["per_tag"] or (after and t in after["per_tag"])]
    if after is None:
        lines = [f"| {'tag':<15} | {'score':>15} |", f"|{'-' * 17}|{'-' * 17}|"]
        for t in tags:
            lines.append(f"| {t:<15} | {_fmt(before['per_tag'][t], before['per_tag_stderr'][t]):>15} |")
        lines.append(f"| {'overall':<15} | {_fmt(before['overall'], before['stderr']):>15} |")
        return "\n".join(lines)
    paired = before.get("prompts") == after.get("prompts") and all(
        "per_prompt" in x and "tags" in x for x in (before, after)
    )
    dse = {}
    if paired:
        d = [a - b for a, b in zip(after["per_prompt"], before["per_prompt"], strict=True)]
        _, dse, _, d_overall_se = _tag_stats(before["tags"], d)
    lines = [
        f"| {'tag':<15} | {'before':>15} | {'after':>15} | {'delta':>8} | {'z':>5} |",
        f"|{'-' * 17}|{'-' * 17}|{'-' * 17}|{'-' * 10}|{'-' * 7}|",
    ]
    rows = [
        (
            t,
            before["per_tag"].get(t),
            before["per_tag_stderr"].get(t),
            after["per_tag"].get(t),
            after["per_tag_stderr"].get(t),
        )
        for t in tags
    ]
    rows.append(("overall", before["overall"], before["stderr"], after["overall"], after["stderr"]))
    for t, b, bs, a, as_ in rows:
        if a is None or b is None:
            lines.append(f"| {t:<15} | {_fmt(b, bs):>15} | {_fmt(a, as_):>15} | {'-':>8} | {'-':>5} |")
            continue
        se = (d_overall_se if t == "overall" else dse.get(t)) if paired else math.sqrt(bs * bs + as_ * as_)
        z = (a - b) / se if se else (float("inf") if a != b else 0.0)
        lines.append(f"| {t:<15} | {_fmt(b, bs):>15} | {_fmt(a, as_):>15} | {a - b:>+8.3f} | {z:>5.1f} |")
    return "\n".join(lines)
