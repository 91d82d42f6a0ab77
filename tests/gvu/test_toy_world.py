"""The shapes world: exact render/read, prompt sets, evaluator semantics, false perturbations."""

import random

import numpy as np
import pytest

from gvu.toy import prompts as WP
from gvu.toy import world as W


def scene(*objs):
    """codes (36,) from (shape, colour, size, row, col) tuples."""
    c = np.zeros(W.IMAGE_LEN, np.int64)
    for s, k, z, r, col in objs:
        c[r * W.GRID + col] = W.code_of(W.SHAPES.index(s), W.COLORS.index(k), W.SIZES.index(z))
    return c


def meta(prompt):
    m = WP.parse_prompt(prompt)
    assert m is not None, prompt
    return m


def test_render_read_round_trip():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, W.NUM_CODES, size=(7, W.IMAGE_LEN))
    px = W.render(codes)
    assert px.shape == (7, 96, 96, 3) and px.dtype == np.uint8
    assert (W.read_image(px) == codes).all()
    assert (W.read_image(W.render(codes[0])) == codes[0]).all()
    assert (W.read_image(W.render(np.arange(W.NUM_CODES)[None, :36])) == np.arange(36)).all()
    noisy = np.clip(px.astype(int) + rng.integers(-20, 21, px.shape), 0, 255).astype(np.uint8)
    assert (W.read_image(noisy) == codes).all()
    assert (W.render(codes) == px).all()  # deterministic


def test_prompt_sets_disjoint_reproducible_and_cover_tags():
    tr, ev = WP.make_prompt_sets(0)
    tr2, ev2 = WP.make_prompt_sets(0)
    assert tr == tr2 and ev == ev2
    assert {m["prompt"] for m in tr}.isdisjoint({m["prompt"] for m in ev})
    assert {WP.meaning_key(m) for m in tr}.isdisjoint({WP.meaning_key(m) for m in ev})
    assert {m["tag"] for m in ev} == set(W.TAGS) == {m["tag"] for m in tr}
    _, ev3 = WP.make_prompt_sets(1)
    assert [m["prompt"] for m in ev3] != [m["prompt"] for m in ev]
    for m in tr[::97] + ev:
        assert WP.parse_prompt(m["prompt"], m["tag"]) == m


def test_wording():
    assert meta("a photo of a red circle")["include"] == [{"class": "circle", "count": 1, "color": "red"}]
    m = meta("a photo of three stars")
    assert m["include"] == [{"class": "star", "count": 3}] and m["exclude"] == [{"class": "star", "count": 4}]
    m = meta("a photo of a blue square left of a green heart")
    assert m["include"][0] == {"class": "heart", "count": 1, "color": "green"}
    assert m["include"][1]["position"] == ["left of", 0]
    assert WP.parse_prompt("a photo of a orange star") is None  # 'an orange star'
    assert WP.parse_prompt("a photo of two circle") is None
    assert WP.parse_prompt("a photo of a circle and a circle") is None


def test_evaluator_hand_made_scenes():
    one = scene(("circle", "red", "large", 2, 2))
    assert W.evaluate(meta("a photo of a red circle"), one)
    assert W.evaluate(meta("a photo of a circle"), one)
    assert W.evaluate(meta("a photo of a large red circle"), one)
    assert not W.evaluate(meta("a photo of a blue circle"), one)
    assert not W.evaluate(meta("a photo of a red square"), one)
    assert not W.evaluate(meta("a photo of a small circle"), one)
    assert W.evaluate(meta("a photo of a red circle"), W.render(one))  # pixels are read back

    three = scene(*[("star", "blue", "small", 0, c) for c in range(3)])
    assert W.evaluate(meta("a photo of three stars"), three)
    assert W.evaluate(meta("a photo of three blue stars"), three)
    assert W.evaluate(meta("a photo of a star"), three)  # 'a' means at least one (GenEval)
    assert not W.evaluate(meta("a photo of two stars"), three)  # number words are exact
    assert not W.evaluate(meta("a photo of four stars"), three)
    assert not W.evaluate(meta("a photo of three red stars"), three)

    pair = scene(("square", "blue", "small", 3, 0), ("heart", "green", "large", 3, 4))
    assert W.evaluate(meta("a photo of a blue square left of a green heart"), pair)
    assert W.evaluate(meta("a photo of a heart right of a square"), pair)
    assert not W.evaluate(meta("a photo of a square right of a heart"), pair)
    assert not W.evaluate(meta("a photo of a square above a heart"), pair)
    assert W.evaluate(meta("a photo of a square and a heart"), pair)
    assert not W.evaluate(meta("a photo of a square and a star"), pair)
    assert W.evaluate(meta("a photo of a small square left of a large heart"), pair)
    assert not W.evaluate(meta("a photo of a large square left of a large heart"), pair)
    assert W.evaluate(meta("a photo of a blue square and a green heart"), pair)
    assert not W.evaluate(meta("a photo of a green square and a blue heart"), pair)  # attribute binding

    # diagonal offsets hold two relations (60-degree cones), a steep one only the vertical
    diag = scene(("circle", "red", "small", 0, 0), ("cross", "red", "small", 1, 1))
    assert W.relations(W.objects_of(diag)[0], W.objects_of(diag)[1]) == {"left of", "above"}
    steep = scene(("circle", "red", "small", 0, 0), ("cross", "red", "small", 2, 1))
    assert W.relations(W.objects_of(steep)[0], W.objects_of(steep)[1]) == {"above"}

    # every related object must hold the relation to every target object
    many = scene(("circle", "red", "small", 0, 0), ("circle", "red", "small", 0, 5), ("square", "red", "small", 0, 3))
    assert not W.evaluate(meta("a photo of two circles left of a square"), many)
    assert W.evaluate(meta("a photo of two circles and a square"), many)
    assert not W.evaluate(meta("a photo of two circles and two squares"), many)


def test_score_table():
    ms = [{"tag": "counting"}, {"tag": "counting"}, {"tag": "colors"}]
    t = W.score_table(ms, [True, False, True])
    assert t["counting"] == 0.5 and t["colors"] == 1.0 and t["overall"] == pytest.approx(0.75)


def test_sampled_scenes_satisfy_their_prompts():
    tr, ev = WP.make_prompt_sets(0)
    rng = random.Random(0)
    for m in ev + rng.sample(tr, 200):
        c = W.sample_scene(m, rng)
        assert W.evaluate(m, c)
        # a scene holds exactly the prompt's objects
        assert (c > 0).sum() == sum(e["count"] for e in m["include"])


@pytest.mark.parametrize("kind", W.PERTURB_KINDS)
def test_perturbations_are_false_and_change_one_word(kind):
    tr, ev = WP.make_prompt_sets(0)
    rng = random.Random(1)
    n = 0
    for m in ev:
        c = W.sample_scene(m, rng)
        for img in (None, c):
            q = WP.perturb(m, kind, rng, image=img)
            if q is None:
                assert kind in ("color", "position", "size")  # only prompts that state one
                continue
            n += 1
            assert not W.evaluate(q, c), (m["prompt"], q["prompt"])
            a, b = m["prompt"].split(), q["prompt"].split()
            if kind == "position":
                assert q["include"][1]["position"][0] == W.OPPOSITE[m["include"][1]["position"][0]]
            elif len(a) == len(b):
                assert sum(x != y for x, y in zip(a, b, strict=True)) <= 2  # the word (+ 'a'/'an' agreement)
    assert n > 0
    with pytest.raises(ValueError, match="unknown perturbation"):
        WP.perturb(ev[0], "size_of_sky", rng)
