"""Held-out evaluation in the shapes world: GenEval-style generation scores and understanding checks.

generation_scores: rollout -> pixels -> read back -> exact evaluator; per-tag accuracy, overall = mean over
    tags, standard errors clustered by prompt (gvu.evaluate.generation_summary).
understanding_scores: (i) greedy caption accuracy (the caption, parsed, is true for the scene) and (ii) for
    each word type (count, color, position, shape, size: the paper's sensitivity check), how often the intrinsic
    reward of the true prompt beats a one-word-perturbed false prompt on the same image. Gate RL on (ii): a reward
    blind to a word type gets hacked on it (docs/results/README.md, prototype facts).
imbalance (UniRL's): of the generated images the exact evaluator calls correct, the fraction the model's own
    understanding misreads, and of those it calls wrong, the fraction the understanding reads as matching the
    prompt, per tag and overall (pooled over images). The reading asks the understanding each fact of the prompt
    (UniRL's per-tag questions; here qa's clozes) as a multiple choice among the answers of its kind: it matches
    when every fact's answer is the prompt's (`read_as_matching`). Not the free caption: the toy captions a scene
    with one true prompt of its choice (often the colours and not the relation), which does not say it misread.
ShapesEvaluator wires them into the trainer (gvu.evaluate.Evaluator), sharded over ranks.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from gvu.config import SamplingConfig
from gvu.evaluate import gather_per_prompt, generation_summary, per_prompt_scores
from gvu.models import understanding_passes
from gvu.rewards import intrinsic_reward, qa
from gvu.toy import prompts as WP
from gvu.toy import world as W
from gvu.toy.questions import caption_facts


def _exact_scores(chunk: list[dict], images: np.ndarray, prompts) -> list[float]:
    """1.0 / 0.0 per image by the world's exact evaluator; images (B*G, H, W, 3), G consecutive per meta."""
    codes = W.read_image(images)
    g = len(codes) // len(chunk)
    return [float(W.evaluate(chunk[i // g], c)) for i, c in enumerate(codes)]


def generation_scores(
    backend, model, metas: list[dict], samples_per_prompt: int = 16, sampling=None, batch_size=32, seed=0, bar=False,
    understanding=None,
) -> dict:  # fmt: skip
    """GenEval-style scores of `samples_per_prompt` rollouts per prompt (gvu.evaluate.generation_summary's dict).
    `understanding` (a context factory for the understanding's passes): also read every image (read_as_matching)
    and add "reading": per prompt (correct, correct but misread, wrong, wrong but read as matching) image counts."""
    reading = []

    def score(chunk, images, prompts):
        ok = _exact_scores(chunk, images, prompts)
        if understanding is not None:
            g = len(ok) // len(chunk)
            with understanding():
                read = read_as_matching(backend, model, [m for m in chunk for _ in range(g)], images)
            reading.extend(
                reading_counts(ok[i * g : (i + 1) * g], read[i * g : (i + 1) * g]) for i in range(len(chunk))
            )
        return ok

    per_prompt = per_prompt_scores(
        backend, model, metas, samples_per_prompt, sampling or SamplingConfig(), score, seed, batch_size, bar
    )
    out = generation_summary(metas, per_prompt, samples_per_prompt)
    return {**out, "reading": reading} if understanding is not None else out


def choices(meta: dict) -> list[tuple[str, list[str], int]]:
    """The prompt's facts as multiple-choice clozes (gvu.rewards.qa's questions): (caption prefix, the answers of
    the fact's kind, index of the prompt's own); [] outside the prompt grammar."""
    found = qa.slots(meta)
    if found is None:
        return []
    words, facts = found
    kinds = {"count": [W.NUMBERS[n] for n in (2, 3, 4)], "color": list(W.COLORS), "size": list(W.SIZES),
             "position": list(W.RELATIONS)}  # fmt: skip
    out = []
    for kind, a, b, j in facts:
        alts = kinds.get(kind) or (list(W.SHAPES) if meta["include"][j]["count"] == 1 else list(W.PLURALS.values()))
        out.append((" ".join(words[:a]), alts, alts.index(" ".join(words[a:b]))))
    return out


@torch.no_grad()
def read_as_matching(backend, model, metas: list[dict], images) -> list[bool]:
    """Per image (metas[i] its prompt): does the understanding, asked each fact of the prompt as a cloze, give the
    prompt's answer the highest probability among the answers of that kind? The answers of a kind differ in their
    first word, so one teacher-forced pass of each image's prompt decides them all (the toy's words are its
    tokens; a plain forward of understanding_inputs: the vocabulary is ~180 ids)."""
    prompts = backend.tokenize_prompts([m["prompt"] for m in metas])
    u = backend.understanding_inputs(images, prompts)
    dev = next(model.parameters()).device
    logits = model(input_ids=u.input_ids.to(dev), **u.forward_kwargs).logits.float().cpu()
    P = u.input_ids.shape[1] - u.targets.shape[1]  # position P - 1 + j predicts the prompt's word j
    asked = {m["prompt"]: choices(m) for m in metas}  # G samples share a prompt: ask once per prompt
    first = {a: backend.encode_text(a)[0] for cs in asked.values() for _, alts, _ in cs for a in alts}
    out = []
    for i, m in enumerate(metas):
        cs = asked[m["prompt"]]
        ok = bool(cs)
        for q, alts, right in cs:
            ok &= int(logits[i, P - 1 + len(q.split()), [first[a] for a in alts]].argmax()) == right
        out.append(ok)
    return out


def reading_counts(correct: list[float], read: list[bool]) -> tuple[int, int, int, int]:
    """One prompt's images -> (correct, correct but misread, wrong, wrong but read as matching)."""
    ok = [bool(c) for c in correct]
    return (sum(ok), sum(o and not r for o, r in zip(ok, read, strict=True)), len(ok) - sum(ok),
            sum(r and not o for o, r in zip(ok, read, strict=True)))  # fmt: skip


def imbalance(metas: list[dict], counts: list[tuple]) -> dict:
    """Per-prompt reading counts -> {per_tag: {tag: row}, overall: row}, row = {correct_misread, wrong_read_ok:
    fractions (None without such images), n_correct, n_wrong}, pooled over the images of a tag / of all."""

    def row(cs):
        c, cm, w, wr = (sum(x[i] for x in cs) for i in range(4))
        return {"correct_misread": cm / c if c else None, "wrong_read_ok": wr / w if w else None,
                "n_correct": c, "n_wrong": w}  # fmt: skip

    tags = list(dict.fromkeys(m.get("tag", "all") for m in metas))
    per_tag = {t: row([c for m, c in zip(metas, counts, strict=True) if m.get("tag", "all") == t]) for t in tags}
    return {"per_tag": per_tag, "overall": row(counts)}


def format_imbalance(result: dict) -> str:
    """The imbalance as a per-tag table (fractions of the tag's correct / wrong images)."""
    lines = [f"| {'tag':<15} | {'correct, misread':>17} | {'wrong, read ok':>17} |"]
    lines.append(f"|{'-' * 17}|{'-' * 19}|{'-' * 19}|")
    for t, r in [*result["per_tag"].items(), ("overall", result["overall"])]:
        cells = [f"{'-' if r[k] is None else f'{r[k]:.3f}'} of {r[n]:<4d}" for k, n in
                 (("correct_misread", "n_correct"), ("wrong_read_ok", "n_wrong"))]  # fmt: skip
        lines.append(f"| {t:<15} | {cells[0]:>17} | {cells[1]:>17} |")
    return "\n".join(lines)


@torch.no_grad()
def understanding_scores(backend, model, metas: list[dict], seed: int = 0, batch_size: int = 128) -> dict:
    """Caption accuracy and true-vs-perturbed reward ranking on scenes sampled consistent with `metas`.

    -> {caption_acc, caption_exact, ranking: {kind: acc}, ranking_n: {kind: n}, n_scenes, examples: a few (prompt,
    caption)}. caption_exact: the caption holds AND states every colour and the relation of its scene
    (gvu/toy/questions.caption_facts), since a captioner can raise caption_acc by saying less.
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
    ok, exact = [], []
    for cap, sc, m in zip(captions, scenes, metas, strict=True):
        parsed = WP.parse_prompt(cap)
        ok.append(parsed is not None and W.evaluate(parsed, sc))
        stated, facts = caption_facts(cap, m)  # a caption can hold by saying less: count the ones that say it all
        exact.append(ok[-1] and stated == facts)

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
        "caption_exact": float(np.mean(exact)),
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
        "caption_exact": sum(p["caption_exact"] * p["n_scenes"] for p in parts) / max(n, 1),
        "ranking": ranking,
        "ranking_n": ranking_n,
        "n_scenes": n,
        "examples": [e for p in parts for e in p["examples"]][:8],
    }


class ShapesEvaluator:
    """The shapes world's exact evaluator on held-out prompts, and the understanding checks (caption accuracy,
    true-vs-perturbed ranking). Understanding runs as lora.scope says (gvu.models.understanding_passes: the adapter
    off under generation, the understanding adapter under split)."""

    name = "shapes"

    def evaluate(self, backend, model, metas, cfg, rank, world) -> dict:
        shard, seed = metas[rank::world], cfg.train.seed * 7919 + rank

        def understanding():  # the understanding's passes under lora.scope
            return understanding_passes(model, cfg.lora.scope)

        gen = generation_scores(
            backend, model, shard, cfg.train.eval_samples, cfg.sampling, seed=seed, bar=rank == 0,
            understanding=understanding,
        )  # fmt: skip
        with understanding():
            und = understanding_scores(backend, model, shard, seed=seed)
        per_prompt = gather_per_prompt(gen["per_prompt"], len(metas), world)
        reading = gather_per_prompt(gen["reading"], len(metas), world)
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, und)
            und = merge_understanding(parts)
        return {
            "generation": generation_summary(metas, per_prompt, cfg.train.eval_samples),
            "understanding": und,
            "imbalance": imbalance(metas, reading),
        }

    def summary(self, label: str, result: dict) -> str:
        g, u = result["generation"], result["understanding"]
        rank = ", ".join(f"{k} {v:.2f}" for k, v in u["ranking"].items())
        line = (
            f"[{label}] generation overall {g['overall']:.3f} +- {g['stderr']:.3f} ({g['n']} images) | "
            f"understanding: caption acc {u['caption_acc']:.3f}"
            + (f" (exact {u['caption_exact']:.3f})" if "caption_exact" in u else "")
            + f", true-vs-perturbed ranking: {rank}"
        )
        if "imbalance" not in result:  # a result saved before the imbalance was measured
            return line
        return f"{line}\n[{label}] imbalance of generation and understanding:\n{format_imbalance(result['imbalance'])}"

    def rollout_metrics(self, metas, images, group_size) -> dict[str, float]:
        """train/score: the exact evaluator on the training rollouts themselves, a free score curve."""
        rows = [m for m in metas for _ in range(group_size)]
        return {"train/score": float(np.mean(_exact_scores(rows, images, None)))}
