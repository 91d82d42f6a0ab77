"""The shapes world: synthetic scenes, their exact renderer and reader, GenEval-style prompts and evaluator.

A scene is a 6x6 grid of cell codes, int64 (36,) in raster order: 0 is an empty cell, 1..120 a sprite
(shape, colour, size). `render` draws codes as uint8 pixels (N, 96, 96, 3) with 16 px cells; `read_image`
reads pixels back to codes exactly, so the evaluator judges what was drawn, never the tokens.

Prompt metadata follows GenEval (`tag`, `prompt`, `include: [{class, count, color?, size?, position?}]`,
`exclude: [{class, count, color?, size?}]`) for GenEval's six tags and GenEval++'s five compositional ones.
Semantics (GenEval's): an include entry needs at least `count` objects of its class (and colour / size when
given); number words ("two".."four") are exact through an exclude entry of count+1; "a X" means at least one.
Position: every object of the entry stands in the relation to every object of the target entry, judged by
cell centres with GenEval's rule (a relation holds when the offset's component along that axis exceeds half
the offset's length, a 60-degree cone). GenEval also subtracts a margin of 0.1 x the two boxes' sizes; objects
here occupy distinct cells, so centres are always >= 1 cell apart and no margin is needed.
"""

from __future__ import annotations

import copy
import random
from collections import defaultdict

import numpy as np

GRID = 6
CELL = 16
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "heart": "hearts",
    "cross": "crosses",
}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RGB = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (255, 130, 190),
    "brown": (130, 80, 30),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
BACKGROUND = (128, 128, 128)  # not one of the ten object colours
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
WORD_TO_COUNT = {"an": 1, **{w: n for n, w in NUMBERS.items()}}
NUM_CODES = 1 + len(SHAPES) * len(COLORS) * len(SIZES)  # 121, code 0 = empty
IMAGE_LEN = GRID * GRID

TAGS = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
    "color_count",
    "color_position",
    "position_count",
    "position_size",
    "multi_count",
)
PERTURB_KINDS = ("count", "color", "position", "shape")


# ----------------------------------------------------------------------------------------------- codes


def code_of(shape: int, color: int, size: int) -> int:
    """(shape index, colour index, size index) -> cell code in 1..120."""
    return 1 + (shape * len(COLORS) + color) * len(SIZES) + size


def attrs_of(code: int) -> tuple[int, int, int]:
    """Cell code in 1..120 -> (shape index, colour index, size index)."""
    c = code - 1
    return c // (len(COLORS) * len(SIZES)), (c // len(SIZES)) % len(COLORS), c % len(SIZES)


def objects_of(codes) -> list[dict]:
    """Codes (36,) or (6, 6) -> [{class, color, size, row, col}] for the non-empty cells."""
    flat = np.asarray(codes).reshape(-1)
    out = []
    for i, c in enumerate(flat.tolist()):
        if c:
            s, k, z = attrs_of(c)
            out.append({"class": SHAPES[s], "color": COLORS[k], "size": SIZES[z], "row": i // GRID, "col": i % GRID})
    return out


# ------------------------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, radius: float) -> np.ndarray:
    """Bool (CELL, CELL) sprite mask of a shape with the given half-extent in pixels."""
    yy, xx = np.mgrid[0:CELL, 0:CELL].astype(np.float64)
    x, y = (xx - (CELL - 1) / 2) / radius, (yy - (CELL - 1) / 2) / radius  # unit box [-1, 1]
    if shape == "circle":
        return x**2 + y**2 <= 1.0
    if shape == "square":
        return (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    if shape == "triangle":  # apex up
        return (y <= 0.9) & (y >= -0.9) & (np.abs(x) <= (y + 0.9) / 1.8)
    if shape == "star":  # five points: radius threshold interpolates outer 1.0 / inner 0.45 by angle
        ang = (np.arctan2(x, -y) % (2 * np.pi / 5)) / (2 * np.pi / 5)
        lim = 0.45 + 0.55 * np.abs(1 - 2 * ang)
        return np.sqrt(x**2 + y**2) <= lim
    if shape == "heart":
        hx, hy = x * 1.2, -y * 1.2 + 0.25
        return (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0
    if shape == "cross":
        inside = (np.abs(x) <= 0.95) & (np.abs(y) <= 0.95)
        return inside & ((np.abs(x) <= 0.3) | (np.abs(y) <= 0.3))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _build_sprites() -> np.ndarray:
    """uint8 (NUM_CODES, CELL, CELL, 3): the cell image of every code."""
    sprites = np.empty((NUM_CODES, CELL, CELL, 3), np.uint8)
    sprites[:] = BACKGROUND
    for s, shape in enumerate(SHAPES):
        for z, radius in enumerate((4.0, 7.5)):
            mask = _shape_mask(shape, radius)
            for k, color in enumerate(COLORS):
                sprites[code_of(s, k, z)][mask] = RGB[color]
    flat = sprites.reshape(NUM_CODES, -1)
    if len({row.tobytes() for row in flat}) != NUM_CODES:
        raise AssertionError("two codes render to the same sprite; read_image would not be exact")
    return sprites


SPRITES = _build_sprites()
SPRITES_FLAT = SPRITES.reshape(NUM_CODES, -1)
_SPRITES_F = SPRITES_FLAT.astype(np.float32)
_HASH_W = np.random.default_rng(12345).integers(1, 2**62, size=CELL * CELL * 3, dtype=np.int64)
with np.errstate(over="ignore"):
    _SPRITE_KEYS = SPRITES_FLAT.astype(np.int64) @ _HASH_W
_SPRITE_KEYS_ORDER = np.argsort(_SPRITE_KEYS)
_SPRITE_KEYS_SORTED = _SPRITE_KEYS[_SPRITE_KEYS_ORDER]
assert len(np.unique(_SPRITE_KEYS)) == NUM_CODES, "sprite hashes collide"


def render(codes) -> np.ndarray:
    """Codes int (N, 36) (or (36,)) -> uint8 pixels (N, 96, 96, 3) (or (96, 96, 3)). Deterministic."""
    c = np.asarray(codes, dtype=np.int64)
    single = c.ndim == 1
    c = c.reshape(-1, IMAGE_LEN)
    if c.size and (c.min() < 0 or c.max() >= NUM_CODES):
        raise ValueError(f"codes must lie in [0, {NUM_CODES}); got [{c.min()}, {c.max()}]")
    cells = SPRITES[c].reshape(-1, GRID, GRID, CELL, CELL, 3)
    img = cells.transpose(0, 1, 3, 2, 4, 5).reshape(-1, GRID * CELL, GRID * CELL, 3)
    return img[0] if single else img


def read_image(pixels) -> np.ndarray:
    """uint8 pixels (N, 96, 96, 3) (or (96, 96, 3)) -> codes int64 (N, 36) (or (36,)).

    Cells that are exactly a sprite are found by a hash lookup (the renderer is exact); any other cell (e.g. from
    a lossy PNG) is matched to the nearest sprite by squared distance. The lookup made the trainer's per-step
    scoring of 128 rollouts ~100x cheaper than matching every cell (28 ms -> well under 1 ms per image).
    """
    p = np.asarray(pixels)
    single = p.ndim == 3
    p = p.reshape(-1, GRID * CELL, GRID * CELL, 3)
    if p.shape[1:] != (GRID * CELL, GRID * CELL, 3):
        raise ValueError(f"pixels must be (N, {GRID * CELL}, {GRID * CELL}, 3); got {np.asarray(pixels).shape}")
    cells = p.reshape(-1, GRID, CELL, GRID, CELL, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, CELL * CELL * 3)
    keys = cells.astype(np.int64) @ _HASH_W  # wraps modulo 2^64: a hash, equal for equal cells
    pos = np.clip(np.searchsorted(_SPRITE_KEYS_SORTED, keys), 0, NUM_CODES - 1)
    out = _SPRITE_KEYS_ORDER[pos]
    exact = (_SPRITE_KEYS_SORTED[pos] == keys) & (SPRITES_FLAT[out] == cells).all(1)
    if not exact.all():
        x = cells[~exact].astype(np.float32)
        d = (_SPRITES_F**2).sum(1)[None, :] - 2 * x @ _SPRITES_F.T
        out[~exact] = d.argmin(1)
    out = out.reshape(-1, IMAGE_LEN)
    return out[0] if single else out


# --------------------------------------------------------------------------------------------- prompts


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


# ------------------------------------------------------------------------------------------- evaluator


def relations(a: dict, b: dict) -> set[str]:
    """Relations of object a to object b ({row, col} dicts) by cell centres: GenEval's 60-degree cones."""
    dx, dy = a["col"] - b["col"], a["row"] - b["row"]  # rows grow downwards
    norm = (dx * dx + dy * dy) ** 0.5
    out = set()
    if norm == 0:
        return out
    if dx / norm < -0.5:
        out.add("left of")
    if dx / norm > 0.5:
        out.add("right of")
    if dy / norm < -0.5:
        out.add("above")
    if dy / norm > 0.5:
        out.add("below")
    return out


def _matches(obj: dict, spec: dict) -> bool:
    return obj["class"] == spec["class"] and all(obj[k] == spec[k] for k in ("color", "size") if k in spec)


def _as_codes(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == np.uint8 and a.ndim == 3:
        return read_image(a)
    return a.reshape(-1)


def evaluate(meta: dict, image) -> bool:
    """True when the image satisfies the metadata. image: codes int (36,) / (6, 6) or uint8 pixels (96, 96, 3)."""
    objs = objects_of(_as_codes(image))
    groups: list[list[dict] | None] = []
    ok = True
    for req in meta["include"]:
        found = [o for o in objs if _matches(o, req)]
        matched = len(found) >= req["count"]
        if matched and "position" in req:
            rel, target = req["position"]
            tgt = groups[target]
            matched = tgt is not None and all(rel in relations(o, t) for o in found for t in tgt)
        groups.append(found if matched else None)
        ok &= matched
    for req in meta.get("exclude", []):
        if sum(_matches(o, req) for o in objs) >= req["count"]:
            ok = False
    return bool(ok)


def score_table(metas: list[dict], correct) -> dict:
    """Per-tag accuracy and overall = mean over the tags present. correct: bools, one per meta (or per sample
    when metas repeats each meta)."""
    by = defaultdict(list)
    for m, c in zip(metas, correct, strict=True):
        by[m["tag"]].append(float(c))
    table = {t: float(np.mean(by[t])) for t in TAGS if t in by}
    table["overall"] = float(np.mean(list(table.values()))) if table else float("nan")
    return table


# ---------------------------------------------------------------------------------------------- scenes


def sample_scene(meta: dict, rng: random.Random, *, unambiguous: bool = True, tries: int = 200) -> np.ndarray:
    """Codes int64 (36,) of a scene that satisfies `meta`: exactly the prompt's objects, unspecified colours and
    sizes drawn at random. With `unambiguous`, a related pair stands in ONLY the stated relation (offset within
    30 degrees of the axis), so a scene's relation words are unique."""
    for _ in range(tries):
        codes = np.zeros(IMAGE_LEN, np.int64)
        cells: list[list[int]] = []
        failed = False
        for req in meta["include"]:
            placed = []
            for _ in range(req["count"]):
                free = [i for i in range(IMAGE_LEN) if codes[i] == 0]
                if "position" in req:
                    rel, target = req["position"]
                    ok_cells = []
                    for i in free:
                        a = {"row": i // GRID, "col": i % GRID}
                        good = True
                        for t in cells[target]:
                            rs = relations(a, {"row": t // GRID, "col": t % GRID})
                            if rel not in rs or (unambiguous and len(rs) != 1):
                                good = False
                                break
                        if good:
                            ok_cells.append(i)
                    free = ok_cells
                if not free:
                    failed = True
                    break
                i = rng.choice(free)
                s = SHAPES.index(req["class"])
                k = COLORS.index(req["color"]) if "color" in req else rng.randrange(len(COLORS))
                z = SIZES.index(req["size"]) if "size" in req else rng.randrange(len(SIZES))
                codes[i] = code_of(s, k, z)
                placed.append(i)
            if failed:
                break
            cells.append(placed)
        if not failed and evaluate(meta, codes):
            return codes
    raise RuntimeError(f"could not sample a scene for {meta['prompt']!r} in {tries} tries")


# ------------------------------------------------------------------------------------------ perturbing


def _perturbations(meta: dict, kind: str) -> list[dict]:
    """Every one-word change of `kind` (count, color, position, shape) to `meta`, as new metas."""
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
    """One-word-changed metadata whose prompt is false: count (number word), color, shape, or position (the
    opposite relation, always false when the original holds). With `image` (codes or pixels) the result is
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
