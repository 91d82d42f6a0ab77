"""The toy's understanding questions with exact answers, for joint RL (gvu/joint.py).

A question is one fact of a prompt's GenEval metadata (an entry's count >= 2, colour, size or shape, or the
relation), asked as a multiple choice on the caption language (the toy has no Ability.QUESTIONS): its choices are
the prompt with that fact set to each answer of its kind (the prompt's own among them), cut after the words every
choice shares. "a photo of three red circles", count -> question "a photo of", choices "two red circles",
"three red circles", "four red circles". A choice carries the rest of its prompt, so it is a whole statement about
the image and the exact evaluator decides it: truth[c] = the scene satisfies choice c's prompt. A one-word cloze
("a photo of" -> "three") would not be: with two counted entries both numbers may start a true caption.

A rendered scene (world.sample_scene: exactly the prompt's objects, the relation alone) satisfies exactly one
choice, the prompt's own. A generated image is judged for what it shows, not for its prompt: it may satisfy
several choices (any of them is right) or none (no right answer among the choices: not asked).

The free-text task beside the questions (joint.captions_per_step): the understanding captions fresh scenes of train
prompts (caption_scenes); a caption scores when it holds for its scene (caption_holds), by how much of the scene
it states (caption_reward).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from gvu.rewards import qa
from gvu.toy import prompts as WP
from gvu.toy import world as W

KINDS = ("count", "color", "size", "shape", "position")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: `image` indexes the images it is asked about; truth[c]: choice c holds."""

    kind: str
    question: str
    choices: tuple[str, ...]
    truth: tuple[bool, ...]
    image: int


def _alternatives(meta: dict, kind: str, j: int) -> list[dict]:
    """Entry j of the include list set to every answer of `kind`, the entry's own included, in a fixed order."""
    inc, e = meta["include"], meta["include"][j]
    if kind == "count":
        return [dict(e, count=n) for n in (2, 3, 4)]
    if kind in ("color", "size"):
        return [dict(e, **{kind: v}) for v in (W.COLORS if kind == "color" else W.SIZES)]
    if kind == "shape":  # not another entry's class: "a star and a star" is one star
        used = {x["class"] for i, x in enumerate(inc) if i != j}
        return [dict(e, **{"class": s}) for s in W.SHAPES if s not in used]
    return [dict(e, position=[r, e["position"][1]]) for r in W.RELATIONS]


def facts(meta: dict, kinds=KINDS) -> list[tuple[str, str, list[dict]]]:
    """(kind, question, [choice metas]) per fact of `meta` whose kind is in `kinds`, choices' prompts cut after the
    question's words; [] for a prompt outside the world's grammar."""
    found = qa.slots(meta)
    if found is None:
        return []
    out = []
    for kind, _, _, j in found[1]:
        kind = "shape" if kind == "object" else kind
        if kind not in kinds:
            continue
        variants = []
        for alt in _alternatives(meta, kind, j):
            inc = [dict(x) for x in meta["include"]]
            inc[j] = alt
            variants.append(WP.make_meta(meta["tag"], inc))
        texts = [v["prompt"].split() for v in variants]
        if meta["prompt"] not in [v["prompt"] for v in variants]:
            continue  # a wording make_meta does not write back: its choices would not be its prompt's
        p = 0
        while all(len(t) > p and t[p] == texts[0][p] for t in texts):
            p += 1
        out.append((kind, " ".join(texts[0][:p]), variants))
    return out


def ask(kind: str, question: str, variants: list[dict], codes: np.ndarray, image: int) -> Question:
    """The question about the scene `codes` int (36,): the choices' words after the question, judged exactly."""
    n = len(question.split())
    choices = tuple(" ".join(v["prompt"].split()[n:]) for v in variants)
    return Question(kind, question, choices, tuple(W.evaluate(v, codes) for v in variants), image)


class ToyQuestions:
    """Questions of a step: `rendered(n, rng)` about fresh scenes of the train prompts, `generated(metas, images, n,
    rng)` about rollout images. Each question's kind is drawn uniformly from `kinds` (position facts are rarer than
    shape facts in the prompts), then a prompt with such a fact."""

    def __init__(self, train_metas: list[dict], kinds=KINDS):
        self.metas = train_metas
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self.by_kind = {k: [] for k in self.kinds}
        for m in train_metas:  # the facts' kinds from the slots alone: building every choice would take seconds
            found = qa.slots(m)
            for k in dict.fromkeys("shape" if s[0] == "object" else s[0] for s in (found[1] if found else [])):
                if k in self.by_kind:
                    self.by_kind[k].append(m)
        self.kinds = tuple(k for k in self.kinds if self.by_kind[k])

    def rendered(self, n: int, rng: random.Random) -> tuple[list[Question], np.ndarray]:
        """n questions, one per fresh scene -> (questions, uint8 pixels (n, 96, 96, 3))."""
        out, scenes = [], []
        for i in range(n):
            kind = rng.choice(self.kinds)
            meta = rng.choice(self.by_kind[kind])
            scene = W.sample_scene(meta, rng)
            _, q, variants = rng.choice([f for f in facts(meta, (kind,))])
            out.append(ask(kind, q, variants, scene, i))
            scenes.append(scene)
        return out, W.render(np.stack(scenes)) if scenes else np.zeros((0, 96, 96, 3), np.uint8)

    def caption_scenes(self, n: int, rng: random.Random) -> tuple[list[dict], np.ndarray]:
        """n train prompts drawn uniformly and a fresh scene of each -> (metas, codes int64 (n, 36)), for the
        captioning task."""
        metas = [rng.choice(self.metas) for _ in range(n)]
        scenes = [W.sample_scene(m, rng) for m in metas]
        return metas, np.stack(scenes) if scenes else np.zeros((0, W.IMAGE_LEN), np.int64)

    def generated(self, metas: list[dict], images: np.ndarray, n: int, rng: random.Random) -> list[Question]:
        """Up to n questions about the rollout's images (row i shows metas[i]'s prompt; image = the row), truth read
        from the pixels; only questions with a right answer among their choices."""
        codes = W.read_image(np.asarray(images))
        pool: dict[str, list[Question]] = {k: [] for k in self.kinds}
        asked = {m["prompt"]: facts(m, self.kinds) for m in metas}  # G samples share a prompt
        for i, (m, c) in enumerate(zip(metas, codes, strict=True)):
            for kind, q, variants in asked[m["prompt"]]:
                x = ask(kind, q, variants, c, i)
                if any(x.truth):
                    pool[kind].append(x)
        out = []
        while len(out) < n and any(pool.values()):
            kind = rng.choice([k for k in self.kinds if pool[k]])
            out.append(pool[kind].pop(rng.randrange(len(pool[kind]))))
        return out


def caption_holds(caption: str, codes: np.ndarray) -> bool:
    """A caption, parsed by the prompt grammar, holds for the scene `codes` int (36,): caption accuracy's rule
    (gvu/toy/evaluator.py); an unparseable caption does not."""
    parsed = WP.parse_prompt(caption)
    return parsed is not None and bool(W.evaluate(parsed, codes))


def caption_facts(caption: str, meta: dict) -> tuple[int, int]:
    """(stated, facts) beyond the objects themselves, for a scene drawn for `meta`: facts = one colour per object
    plus the relation when the prompt has one; stated = the colours the caption names (at most one per object)
    plus 1 if it states a relation where there is one. Truth is caption_holds' business, not this one's."""
    parsed = WP.parse_prompt(caption) or {"include": []}
    objects = sum(e.get("count", 1) for e in meta["include"])
    related = any(e.get("position") for e in meta["include"])
    coloured = sum(e.get("count", 1) for e in parsed["include"] if e.get("color"))
    says = related and any(e.get("position") for e in parsed["include"])
    return min(objects, coloured) + int(says), objects + int(related)


def caption_reward(caption: str, codes: np.ndarray, meta: dict) -> float:
    """The captioning task's reward: 0 unless the caption holds for its scene, then (1 + stated) / (1 + facts)
    (caption_facts): a true caption that names every colour and the relation scores 1, "a star and a cross" for a
    pink star and a black cross 1/3. Truth alone would reward saying less: RL on it made the captions vaguer
    (colours named 0.52 -> 0.34 of objects; docs/results/toy-joint-position-captions-split)."""
    if not caption_holds(caption, codes):
        return 0.0
    stated, facts = caption_facts(caption, meta)
    return (1 + stated) / (1 + facts)
