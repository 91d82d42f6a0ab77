"""Held-out evaluation in the shapes world: GenEval-style generation scores and understanding checks.

generation_scores: rollout -> pixels -> read back -> exact evaluator; per-tag accuracy, overall = mean over
    tags, standard errors clustered by prompt (gvu.evaluate.generation_summary).
understanding_scores: (i) greedy caption accuracy (the caption, parsed, is true for the scene) and (ii) for
    each word type (count, color, position, shape), how often the intrinsic reward of the true prompt beats a
    one-word-perturbed false prompt on the same image. Gate RL on (ii): a reward blind to a word type gets
    hacked on it (docs/results/README.md, prototype facts).
ShapesEvaluator wires both into the trainer (gvu.evaluate.Evaluator), sharded over ranks.
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import torch

from gvu.config import SamplingConfig
from gvu.evaluate import gather_per_prompt, generation_summary, per_prompt_scores
from gvu.models import adapter_disabled
from gvu.rewards import intrinsic_reward
from gvu.toy import prompts as WP
from gvu.toy import world as W


def _exact_scores(chunk: list[dict], images: np.ndarray, prompts) -> list[float]:
    """1.0 / 0.0 per image by the world's exact evaluator; images (B*G, H, W, 3), G consecutive per meta."""
    codes = W.read_image(images)
    g = len(codes) // len(chunk)
    return [float(W.evaluate(chunk[i // g], c)) for i, c in enumerate(codes)]


def generation_scores(
    backend, model, metas: list[dict], samples_per_prompt: int = 16, sampling=None, batch_size=32, seed=0, bar=False
) -> dict:
    """GenEval-style scores of `samples_per_prompt` rollouts per prompt (gvu.evaluate.generation_summary's dict)."""
    per_prompt = per_prompt_scores(
        backend, model, metas, samples_per_prompt, sampling or SamplingConfig(), _exact_scores, seed, batch_size, bar
    )
    return generation_summary(metas, per_prompt, samples_per_prompt)


@torch.no_grad()
def understanding_scores(backend, model, metas: list[dict], seed: int = 0, batch_size: int = 128) -> dict:
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
        captions += backend.caption(model, pixels[i : i + batch_size])
    ok = []
    for cap, sc in zip(captions, scenes, strict=True):
        parsed = WP.parse_prompt(cap)
        ok.append(parsed is not None and W.evaluate(parsed, sc))

    ranking, ranking_n = {}, {}
    for kind in W.PERTURB_KINDS:
        rows, true_p, false_p = [], [], []
        for j, (m, sc) in enumerate(zip(metas, scenes, strict=True)):
            q = WP.perturb(m, kind, rng, image=sc)
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
            texts = true_p[i : i + batch_size] + false_p[i : i + batch_size]
            r = intrinsic_reward(backend, model, img, backend.tokenize_prompts(texts))
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


def merge_understanding(parts: list[dict]) -> dict:
    """Weighted means of per-rank understanding_scores."""
    n = sum(p["n_scenes"] for p in parts)
    kinds = sorted({k for p in parts for k in p["ranking"]})
    ranking, ranking_n = {}, {}
    for k in kinds:
        ranking_n[k] = sum(p["ranking_n"].get(k, 0) for p in parts)
        ranking[k] = sum(p["ranking"].get(k, 0) * p["ranking_n"].get(k, 0) for p in parts) / max(ranking_n[k], 1)
    return {
        "caption_acc": sum(p["caption_acc"] * p["n_scenes"] for p in parts) / max(n, 1),
        "ranking": ranking,
        "ranking_n": ranking_n,
        "n_scenes": n,
        "examples": [e for p in parts for e in p["examples"]][:8],
    }


class ShapesEvaluator:
    """The shapes world's exact evaluator on held-out prompts, and the understanding checks (caption accuracy,
    true-vs-perturbed ranking). Understanding runs with the adapter off under lora.scope=generation."""

    name = "shapes"

    def evaluate(self, backend, model, metas, cfg, rank, world) -> dict:
        shard, seed = metas[rank::world], cfg.train.seed * 7919 + rank
        gen = generation_scores(backend, model, shard, cfg.train.eval_samples, cfg.sampling, seed=seed, bar=rank == 0)
        with adapter_disabled(model) if cfg.lora.scope == "generation" else nullcontext():
            und = understanding_scores(backend, model, shard, seed=seed)
        per_prompt = gather_per_prompt(gen["per_prompt"], len(metas), world)
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, und)
            und = merge_understanding(parts)
        return {"generation": generation_summary(metas, per_prompt, cfg.train.eval_samples), "understanding": und}

    def summary(self, label: str, result: dict) -> str:
        g, u = result["generation"], result["understanding"]
        rank = ", ".join(f"{k} {v:.2f}" for k, v in u["ranking"].items())
        return (
            f"[{label}] generation overall {g['overall']:.3f} +- {g['stderr']:.3f} ({g['n']} images) | "
            f"understanding: caption acc {u['caption_acc']:.3f}, true-vs-perturbed ranking: {rank}"
        )

    def rollout_metrics(self, metas, images, group_size) -> dict[str, float]:
        """train/score: the exact evaluator on the training rollouts themselves, a free score curve."""
        rows = [m for m in metas for _ in range(group_size)]
        return {"train/score": float(np.mean(_exact_scores(rows, images, None)))}
