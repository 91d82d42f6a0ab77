"""GenEval-format training prompts for real models (COCO classes), written as one metadata object per line.

    python -m gvu.prompts --out data/train_prompts.jsonl --num 50000 --exclude evaluation_metadata.jsonl
    python -m gvu.prompts --mix position=2,color_attr=2,counting=1 --counts 2-6 --seed 1 --out data/p.jsonl

Lines follow GenEval's evaluation_metadata.jsonl (djghosh13/geneval, prompts/create_prompts.py) key for key:
{"tag", "include": [{"class", "count", "color"?, "position"?: [relation, target index]}], "exclude"?, "prompt"},
"exclude" only where a number word makes a count exact ([{"class", "count": n + 1}]). The wording is GenEval's,
including its quirks, so that --exclude of GenEval's own file matches text for text: "a photo of ...", "an"
before a vowel letter, plurals by its rule (+"es" after a final "s", else +"s": "two buses", "three sheeps",
"four knifes"), no colour on "person", position entries target the first object ("a X left of a Y" includes
[Y, X with position ["left of", 0]]).

Tags: GenEval's six (single_object, two_object, counting, colors, position, color_attr) and five compositional
ones after GenEval++ (Echo-4o, arXiv 2508.09987). GenEval++'s own metadata could not be consulted, so these names
(color_count, color_position, position_count, position_size, multi_count) and their wording are this project's,
the same as the toy world's (gvu/toy/world.py); "two red cups" excludes a third cup of any colour (GenEval's
excludes have no colour). position_size adds a "size" key ("small" / "large"), which GenEval's detector ignores.

Sizes: each tag's prompt space is finite (single_object has 80). A tag whose share of --num exceeds what is left
of its space after --exclude gets all of it, and its shortfall is spread over the other tags by weight (a note
says so); when the mix's tags together hold fewer than --num prompts it is an error naming each tag's maximum.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

from gvu.config import ConfigError

# GenEval's evaluation/object_names.txt: COCO's 80 classes in COCO order, with mouse, remote and keyboard renamed
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COLORABLE = tuple(c for c in CLASSES if c != "person")  # GenEval: no "[COLOR] person" prompts
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COMPOSITIONAL_TAGS = ("color_count", "color_position", "position_count", "position_size", "multi_count")
TAGS = GENEVAL_TAGS + COMPOSITIONAL_TAGS
DEFAULT_MIX = dict.fromkeys(TAGS, 1.0)  # equal shares; the small tags' shortfall goes to the large ones
DEFAULT_COUNTS = (2, 4)  # GenEval's counting range


def with_article(words: str) -> str:
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


def plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


def noun_phrase(e: dict) -> str:
    """{class, count, color?, size?} -> 'a tv', 'an orange cup', 'three large buses' (GenEval's wording)."""
    adjectives = [e[k] for k in ("size", "color") if k in e]
    if e["count"] == 1:
        return with_article(" ".join(adjectives + [e["class"]]))
    return " ".join([NUMBERS[e["count"]]] + adjectives + [plural(e["class"])])


def make_meta(tag: str, include: list[dict]) -> dict:
    """GenEval metadata for an include list: exact counts through an exclude of count + 1, GenEval's key order."""
    rel = [e for e in include if "position" in e]
    if rel:
        e = rel[0]
        text = f"{noun_phrase(e)} {e['position'][0]} {noun_phrase(include[e['position'][1]])}"
    else:
        text = " and ".join(noun_phrase(e) for e in include)
    meta = {"tag": tag, "include": include}
    exclude = [{"class": e["class"], "count": e["count"] + 1} for e in include if e["count"] >= 2]
    if exclude:
        meta["exclude"] = exclude
    meta["prompt"] = "a photo of " + text
    return meta


def normalize(text: str) -> str:
    """Prompt text as compared for --exclude: case, spacing and a final full stop do not matter."""
    return " ".join(text.lower().split()).rstrip(".").strip()


# ------------------------------------------------------------------------------------- prompt spaces
# Every tag is a finite space indexed 0..size-1 by mixed-radix digits, so a draw of k distinct prompts is a draw
# of k distinct integers: fast for any size, without building the millions of colour/position combinations.


def _pair(i: int, names: tuple) -> tuple[str, str]:
    """The i-th ordered pair of distinct names (len * (len - 1) of them)."""
    a, j = divmod(i, len(names) - 1)
    return names[a], names[j + (j >= a)]


def _obj(name: str, count: int = 1, **kw) -> dict:
    return {"class": name, "count": count, **kw}


@functools.cache
def tag_space(tag: str, counts: tuple[int, int] = DEFAULT_COUNTS) -> tuple[tuple[int, ...], callable]:
    """(digit sizes, build(digits) -> include list) of a tag; the space holds prod(sizes) prompts."""
    C, K, R = CLASSES, COLORABLE, RELATIONS
    N = tuple(range(counts[0], counts[1] + 1))
    pc, pk, pcol = len(C) * (len(C) - 1), len(K) * (len(K) - 1), len(COLORS) * (len(COLORS) - 1)
    spaces = {
        "single_object": ((len(C),), lambda a: [_obj(C[a])]),
        "two_object": ((pc,), lambda p: [_obj(x) for x in _pair(p, C)]),
        "counting": ((len(C), len(N)), lambda a, n: [_obj(C[a], N[n])]),
        "colors": ((len(K), len(COLORS)), lambda a, c: [_obj(K[a], color=COLORS[c])]),
        "position": ((pc, len(R)), lambda p, r: _related(_pair(p, C), [{}, {}], R[r])),
        "color_attr": (
            (pk, pcol),
            lambda p, c: [_obj(x, color=y) for x, y in zip(_pair(p, K), _pair(c, COLORS), strict=True)],
        ),
        "color_count": ((len(K), len(COLORS), len(N)), lambda a, c, n: [_obj(K[a], N[n], color=COLORS[c])]),
        "color_position": (
            (pk, pcol, len(R)),
            lambda p, c, r: _related(_pair(p, K), [{"color": y} for y in _pair(c, COLORS)], R[r]),
        ),
        "position_count": ((pc, len(N), len(R)), lambda p, n, r: _related(_pair(p, C), [{}, {}], R[r], N[n])),
        "position_size": (
            (pc, len(SIZES), len(R)),
            lambda p, z, r: _related(_pair(p, C), [{"size": SIZES[z]}, {"size": SIZES[1 - z]}], R[r]),
        ),
        "multi_count": (
            (pc, len(N), len(N)),
            lambda p, n1, n2: [_obj(x, N[n]) for x, n in zip(_pair(p, C), (n1, n2), strict=True)],
        ),
    }
    if tag not in spaces:
        raise ConfigError(f"unknown tag {tag!r}{_did_you_mean(tag)}")
    return spaces[tag]


def _related(pair: tuple[str, str], attrs: list[dict], rel: str, count: int = 1) -> list[dict]:
    """'a A rel a B' in GenEval's order: the target B first, then A (count `count`) placed relative to entry 0."""
    (a, b), (attr_a, attr_b) = pair, attrs
    return [_obj(b, **attr_b), _obj(a, count, **attr_a, position=[rel, 0])]


def space_size(tag: str, counts: tuple[int, int] = DEFAULT_COUNTS) -> int:
    sizes, _ = tag_space(tag, counts)
    total = 1
    for s in sizes:
        total *= s
    return total


def prompt_at(tag: str, index: int, counts: tuple[int, int] = DEFAULT_COUNTS) -> dict:
    """The index-th prompt of a tag's space (0 <= index < space_size)."""
    sizes, build = tag_space(tag, counts)
    if not 0 <= index < space_size(tag, counts):
        raise IndexError(f"{tag} holds {space_size(tag, counts)} prompts; index {index} is outside")
    digits = []
    for s in reversed(sizes):
        index, d = divmod(index, s)
        digits.append(d)
    return make_meta(tag, build(*reversed(digits)))


def _did_you_mean(tag: str) -> str:
    near = difflib.get_close_matches(tag, TAGS, n=1)
    return f"; did you mean {near[0]!r}?" if near else f"; known tags: {', '.join(TAGS)}"


# ------------------------------------------------------------------------------------------ drawing


def allocate(num: int, weights: dict[str, float], caps: dict[str, float]) -> dict[str, int]:
    """Prompts per tag: `num` split by weight (largest remainders), no tag above its cap; a capped tag's
    shortfall is spread over the others. ConfigError when the caps together hold fewer than `num`."""
    active = [t for t in weights if weights[t] > 0]
    alloc, left = {}, num
    while active:
        total = sum(weights[t] for t in active)
        capped = [t for t in active if left * weights[t] / total >= caps[t]]
        if not capped:
            break
        for t in capped:
            alloc[t] = int(caps[t])
            left -= alloc[t]
            active.remove(t)
    if left > 0 and not active:
        held = ", ".join(f"{t} {alloc[t]}" for t in alloc)
        raise ConfigError(
            f"--num {num}: the tags of --mix hold only {num - left} distinct prompts after --exclude ({held}); "
            "lower --num, add tags to --mix, widen --counts or pass --allow-duplicates"
        )
    if active:
        total = sum(weights[t] for t in active)
        shares = {t: left * weights[t] / total for t in active}
        floors = {t: int(shares[t]) for t in active}
        extra = left - sum(floors.values())
        for t in sorted(active, key=lambda t: floors[t] - shares[t])[:extra]:  # largest remainders first
            floors[t] += 1
        alloc.update(floors)
    return {t: alloc.get(t, 0) for t in weights}


def generate(
    num: int,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    counts: tuple[int, int] = DEFAULT_COUNTS,
    exclude: set[str] | frozenset = frozenset(),
    allow_duplicates: bool = False,
    notes: list[str] | None = None,
) -> list[dict]:
    """`num` prompts (metadata dicts) drawn from the tags of `mix`, none whose normalized text is in `exclude`,
    distinct unless `allow_duplicates`, in a seeded shuffled order: the same arguments give the same list."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    for t in mix:
        tag_space(t, counts)  # unknown tags raise, with a suggestion
    n_ex = len(exclude)
    pools, caps = {}, {}
    for t in mix:
        size = space_size(t, counts)
        if size <= num + n_ex:  # small enough that exclusion may bind: list what is left of the space exactly
            pools[t] = [i for i in range(size) if normalize(prompt_at(t, i, counts)["prompt"]) not in exclude]
            caps[t] = len(pools[t]) if not allow_duplicates or not pools[t] else float("inf")
            if caps[t] < size and notes is not None and mix[t] > 0:
                notes.append(f"{t}: {size - len(pools[t])} of its {size} prompts excluded")
        else:  # more than num prompts remain whatever is excluded
            caps[t] = float("inf")
    alloc = allocate(num, mix, caps)
    for t in mix:
        if notes is not None and mix[t] > 0 and 0 < alloc[t] == caps[t]:
            notes.append(f"{t}: all its {alloc[t]} prompts used (its whole space, less any --exclude)")
    out = []
    for t in mix:
        rng = random.Random(f"{seed}:{t}")  # per tag, so one tag's draw does not depend on the others'
        picks = _draw(t, alloc[t], rng, pools.get(t), counts, exclude, allow_duplicates)
        out += [prompt_at(t, i, counts) for i in picks]
    random.Random(f"{seed}:order").shuffle(out)
    return out


def _draw(tag, k, rng, pool, counts, exclude, replace) -> list[int]:
    """k indices of allowed prompts of `tag`: from the listed pool when there is one, else by rejection from the
    whole space (which then holds more than k allowed prompts, so the loop ends)."""
    if pool is not None:
        return [rng.choice(pool) for _ in range(k)] if replace else rng.sample(pool, k)
    size, seen, out = space_size(tag, counts), set(), []
    while len(out) < k:
        i = rng.randrange(size)
        if not replace and i in seen:
            continue
        seen.add(i)
        if not exclude or normalize(prompt_at(tag, i, counts)["prompt"]) not in exclude:
            out.append(i)
    return out


# ---------------------------------------------------------------------------------------------- CLI


def parse_mix(text: str) -> dict[str, float]:
    """'single_object=1,two_object=2' -> {tag: weight}; tags left out get no prompts."""
    mix, problems = {}, []
    for item in filter(None, (s.strip() for s in text.split(","))):
        tag, eq, w = item.partition("=")
        tag = tag.strip()
        if tag not in TAGS:
            problems.append(f"--mix: unknown tag {tag!r}{_did_you_mean(tag)}")
            continue
        try:
            mix[tag] = float(w) if eq else 1.0
            if not (math.isfinite(mix[tag]) and mix[tag] >= 0):
                raise ValueError
        except ValueError:
            problems.append(f"--mix: {item!r}: the weight must be a number >= 0 (e.g. {tag}=2)")
    if not problems and not any(w > 0 for w in mix.values()):
        problems.append(f"--mix {text!r}: give at least one tag a weight > 0, e.g. --mix position=1")
    if problems:
        raise ConfigError(problems)
    return mix


def parse_counts(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        counts = (int(lo), int(hi or lo))
    except ValueError:
        counts = (0, 0)
    if not 2 <= counts[0] <= counts[1] <= len(NUMBERS) - 1:
        raise ConfigError(f"--counts {text!r}: give A-B with 2 <= A <= B <= {len(NUMBERS) - 1} (GenEval: 2-4)")
    return counts


def read_excluded(paths: list[str]) -> set[str]:
    """Normalized prompt texts of GenEval-format files (every bad line reported, named by file and line)."""
    from gvu.data import read_jsonl_lines

    texts, problems = set(), []
    for p in paths:
        try:
            texts.update(normalize(m["prompt"]) for _, m in read_jsonl_lines(Path(p), "--exclude"))
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gvu.prompts",
        description="Write GenEval-format training prompts (COCO classes) for real models, one JSON object a line.",
        epilog=f"tags: {', '.join(TAGS)}",
    )
    p.add_argument("--out", default="data/train_prompts.jsonl", help="output .jsonl (folders created)")
    p.add_argument("--num", type=int, default=50000, help="number of prompts (the paper trained on 50k)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and arguments give the same file")
    p.add_argument("--mix", default=None, help="tag weights, e.g. single_object=1,position=2 (default: all equal)")
    p.add_argument("--counts", default="2-4", help="number words used by counting tags, A-B (GenEval: 2-4)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="FILE",
        help="GenEval-format .jsonl whose prompts must not appear (repeatable), e.g. the test set",
    )
    p.add_argument("--allow-duplicates", action="store_true", help="draw with replacement (no size limit)")
    args = p.parse_args(argv)
    notes: list[str] = []
    try:
        if args.num < 1:
            raise ConfigError(f"--num {args.num}: must be >= 1")
        mix = parse_mix(args.mix) if args.mix is not None else None
        counts = parse_counts(args.counts)
        excluded = read_excluded(args.exclude)
        metas = generate(args.num, args.seed, mix, counts, excluded, args.allow_duplicates, notes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = [m["prompt"] for m in metas]
    if not args.allow_duplicates and len(set(texts)) != len(texts):  # the spaces are disjoint by construction
        raise AssertionError("duplicate prompts generated; this is a bug in gvu/prompts.py")
    from gvu.metrics import atomic_write_text

    atomic_write_text(args.out, "".join(json.dumps(m) + "\n" for m in metas))
    for n in notes:
        print(f"note: {n}")
    per_tag = Counter(m["tag"] for m in metas)
    print(f"{args.out}: {len(metas)} prompts (seed {args.seed}, {len(excluded)} excluded texts)")
    for t in TAGS:
        if t in per_tag:
            print(f"  {t:<15} {per_tag[t]:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
