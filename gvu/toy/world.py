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
PERTURB_KINDS = ("count", "color", "position", "shape", "size")  # size last: the others draw as before it existed


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
