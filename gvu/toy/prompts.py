"""Prompts of the shapes world in GenEval's metadata format: their text grammar (write and parse), the
disjoint train / held-out sets of the eleven tags, and one-word perturbations for the understanding checks.
Scenes, the renderer and the exact evaluator are in gvu/toy/world.py."""

from __future__ import annotations

import copy
import random
from collections import defaultdict

from gvu.toy.world import (
    COLORS,
    NUMBERS,
    OPPOSITE,
    PERTURB_KINDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    SIZES,
    TAGS,
    WORD_TO_COUNT,
    _as_codes,
    evaluate,
)


def noun_phrase(entry: dict) -> str:
    """{class, count, color?, size?} -> 'a red circle', 'an orange star', 'three large stars'."""
    n = entry["count"]
    words = [entry[k] for k in ("size", "color") if k in entry]
    words.append(entry["class"] if n == 1 else PLURALS[entry["class"]])
    det = NUMBERS[n] if n > 1 else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([det] + words)


def prompt_text(include: list[dict]) -> str:
    """GenEval wording of an include list: related entry first for a position ('a X left of a Y')."""
    rel = [i for i, e in enumerate(include) if "position" in e]
    if rel:
        e = include[rel[0]]
        return f"a photo of {noun_phrase(e)} {e['position'][0]} {noun_phrase(include[e['position'][1]])}"
    return "a photo of " + " and ".join(noun_phrase(e) for e in include)


_SINGULAR = {p: s for s, p in PLURALS.items()}


def _parse_np(words: list[str], i: int) -> tuple[dict, int] | None:
    """Parse 'det [size] [color] shape' at words[i]; (entry, next index) or None."""
    if i >= len(words) or words[i] not in WORD_TO_COUNT:
        return None
    e = {"count": WORD_TO_COUNT[words[i]]}
    i += 1
    if i < len(words) and words[i] in SIZES:
        e["size"] = words[i]
        i += 1
    if i < len(words) and words[i] in COLORS:
        e["color"] = words[i]
        i += 1
    if i >= len(words):
        return None
    w = words[i]
    if e["count"] == 1 and w in SHAPES:
        e["class"] = w
    elif e["count"] > 1 and w in _SINGULAR:
        e["class"] = _SINGULAR[w]
    else:
        return None
    return {"class": e.pop("class"), **e}, i + 1


def parse_prompt(text: str, tag: str = "caption") -> dict | None:
    """Prompt text in the world's grammar -> metadata (make_meta), or None if it is not well formed.

    Used to judge free captions: 'a photo of NP (and NP)*' or 'a photo of NP REL NP' with distinct classes.
    """
    words = text.split()
    if words[:3] != ["a", "photo", "of"]:
        return None
    first = _parse_np(words, 3)
    if first is None:
        return None
    e, i = first
    include = [e]
    if i < len(words) and (" ".join(words[i : i + 2]) in RELATIONS or words[i] in RELATIONS):
        rel = " ".join(words[i : i + 2]) if " ".join(words[i : i + 2]) in RELATIONS else words[i]
        nxt = _parse_np(words, i + len(rel.split()))
        if nxt is None or nxt[1] != len(words):
            return None
        include = [nxt[0], dict(e, position=[rel, 0])]
    else:
        while i < len(words):
            if words[i] != "and":
                return None
            nxt = _parse_np(words, i + 1)
            if nxt is None:
                return None
            include.append(nxt[0])
            i = nxt[1]
    classes = [x["class"] for x in include]
    if len(set(classes)) != len(classes):
        return None
    meta = make_meta(tag, include)
    return meta if meta["prompt"] == " ".join(words) else None


def make_meta(tag: str, include: list[dict]) -> dict:
    """Metadata dict with prompt text and GenEval-style excludes (number words >= 2 are exact)."""
    include = [dict(e) for e in include]
    exclude = []
    for e in include:
        if e["count"] >= 2:
            x = {"class": e["class"], "count": e["count"] + 1}
            for k in ("color", "size"):
                if k in e:
                    x[k] = e[k]
            exclude.append(x)
    return {"tag": tag, "prompt": prompt_text(include), "include": include, "exclude": exclude}


def _enumerate_tag(tag: str) -> list[dict]:
    """Every prompt of a tag, in a fixed order."""
    S, C, R = SHAPES, COLORS, RELATIONS
    pairs = [(a, b) for a in S for b in S if a != b]
    out = []
    if tag == "single_object":
        out = [[{"class": a, "count": 1}] for a in S]
    elif tag == "two_object":
        out = [[{"class": a, "count": 1}, {"class": b, "count": 1}] for a, b in pairs]
    elif tag == "counting":
        out = [[{"class": a, "count": n}] for a in S for n in (2, 3, 4)]
    elif tag == "colors":
        out = [[{"class": a, "count": 1, "color": c}] for a in S for c in C]
    elif tag == "position":
        out = [[{"class": b, "count": 1}, {"class": a, "count": 1, "position": [r, 0]}] for a, b in pairs for r in R]
    elif tag == "color_attr":
        out = [
            [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}]
            for a, b in pairs
            for c1 in C
            for c2 in C
            if c1 != c2
        ]
    elif tag == "color_count":
        out = [[{"class": a, "count": n, "color": c}] for a in S for c in C for n in (2, 3, 4)]
    elif tag == "color_position":
        out = [
            [{"class": b, "count": 1, "color": c2}, {"class": a, "count": 1, "color": c1, "position": [r, 0]}]
            for a, b in pairs
            for c1 in C
            for c2 in C
            if c1 != c2
            for r in R
        ]
    elif tag == "position_count":
        out = [
            [{"class": b, "count": 1}, {"class": a, "count": n, "position": [r, 0]}]
            for a, b in pairs
            for n in (2, 3)
            for r in R
        ]
    elif tag == "position_size":
        out = [
            [{"class": b, "count": 1, "size": z2}, {"class": a, "count": 1, "size": z1, "position": [r, 0]}]
            for a, b in pairs
            for z1 in SIZES
            for z2 in SIZES
            for r in R
        ]
    elif tag == "multi_count":
        out = [
            [{"class": a, "count": n1}, {"class": b, "count": n2}] for a, b in pairs for n1 in (2, 3) for n2 in (2, 3)
        ]
    else:
        raise ValueError(f"unknown tag {tag!r}; known: {TAGS}")
    return [make_meta(tag, inc) for inc in out]


def meaning_key(meta: dict) -> tuple:
    """Hashable meaning of a prompt: equal for 'a X and a Y' / 'a Y and a X' and 'X left of Y' / 'Y right of X'.

    Train/eval splits are made by this key so no eval prompt is a rewording of a train prompt.
    """

    def np_key(e):
        return (e["class"], e["count"], e.get("color", ""), e.get("size", ""))

    inc = meta["include"]
    rel = [e for e in inc if "position" in e]
    if rel:
        e = rel[0]
        a, b, r = np_key(e), np_key(inc[e["position"][1]]), e["position"][0]
        if r in ("right of", "below"):
            a, b, r = b, a, OPPOSITE[r]
        return ("rel", a, r, b)
    return ("and",) + tuple(sorted(np_key(e) for e in inc))


def make_prompt_sets(seed: int = 0, eval_per_tag: int = 16) -> tuple[list[dict], list[dict]]:
    """(train metas, eval metas): every tag's prompts split by meaning, disjoint by text, reproducible.

    Eval takes min(eval_per_tag, half of the tag's meanings) meanings per tag (single_object has only 6), one
    wording each; train gets every wording of the remaining meanings.
    """
    rng = random.Random(seed)
    train, evals = [], []
    for tag in TAGS:
        groups = defaultdict(list)
        for m in _enumerate_tag(tag):
            groups[meaning_key(m)].append(m)
        keys = sorted(groups)
        rng.shuffle(keys)
        n_eval = min(eval_per_tag, len(keys) // 2)
        for k in keys[:n_eval]:
            evals.append(rng.choice(groups[k]))
        for k in keys[n_eval:]:
            train.extend(groups[k])
    return train, evals


# ------------------------------------------------------------------------------------------ perturbing


def _perturbations(meta: dict, kind: str) -> list[dict]:
    """Every one-word change of `kind` (count, color, position, shape, size) to `meta`, as new metas."""
    inc = meta["include"]
    out = []
    for i, e in enumerate(inc):
        alts = []
        if kind == "count":
            alts = [dict(e, count=n) for n in NUMBERS if n != e["count"]]
        elif kind == "color" and "color" in e:
            alts = [dict(e, color=c) for c in COLORS if c != e["color"]]
        elif kind == "shape":
            used = {x["class"] for j, x in enumerate(inc) if j != i}
            alts = [dict(e, **{"class": s}) for s in SHAPES if s != e["class"] and s not in used]
        elif kind == "size" and "size" in e:
            alts = [dict(e, size=z) for z in SIZES if z != e["size"]]
        elif kind == "position" and "position" in e:
            alts = [dict(e, position=[OPPOSITE[e["position"][0]], e["position"][1]])]
        elif kind not in PERTURB_KINDS:
            raise ValueError(f"unknown perturbation kind {kind!r}; known: {PERTURB_KINDS}")
        for a in alts:
            new = copy.deepcopy(inc)
            new[i] = a
            out.append(make_meta(meta["tag"], new))
    return out


def perturb(meta: dict, kind: str, rng: random.Random, image=None) -> dict | None:
    """One-word-changed metadata whose prompt is false: count (number word), color, shape, size (the other one), or
    position (the opposite relation, always false when the original holds). With `image` (codes or pixels) the result is
    checked to be false for it; without, a count change from 'a' may still be true ("a circle" -> "two
    circles" when the scene has two). None when no such change exists (e.g. position on a prompt without one).
    """
    cands = _perturbations(meta, kind)
    if kind == "count" and image is None:
        # an exact number word changed to another number >= 2 is always false; 'a' (at least one) may not be
        safe = [c for c, (old, new) in zip(cands, _count_changes(meta), strict=True) if old >= 2 and new >= 2]
        cands = safe or cands
    if image is not None:
        codes = _as_codes(image)
        cands = [c for c in cands if not evaluate(c, codes)]
    return rng.choice(cands) if cands else None


def _count_changes(meta: dict) -> list[tuple[int, int]]:
    """(old, new) count of each count perturbation, aligned with _perturbations(meta, "count")."""
    return [(e["count"], n) for e in meta["include"] for n in NUMBERS if n != e["count"]]
