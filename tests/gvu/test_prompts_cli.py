"""python -m gvu.prompts: GenEval-format training prompts for real models (gvu/prompts.py)."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from gvu import prompts as P
from gvu import validate
from gvu.config import ConfigError, load_config
from gvu.data import read_jsonl_lines

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = P.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def lines(path: Path) -> list[dict]:
    return [m for _, m in read_jsonl_lines(path)]


# ------------------------------------------------------------ an independent reader of GenEval's wording
# Written from GenEval's create_prompts.py rules, not from gvu/prompts.py, so a wording bug cannot cancel out.

WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
         "ten": 10}  # fmt: skip
SINGULAR = {name: name for name in P.CLASSES} | {
    (name + "es" if name.endswith("s") else name + "s"): name for name in P.CLASSES
}
NOUN = "|".join(sorted(map(re.escape, SINGULAR), key=len, reverse=True))
NP = re.compile(
    rf"(?P<det>{'|'.join(WORDS)}) (?:(?P<size>small|large) )?(?:(?P<color>{'|'.join(P.COLORS)}) )?(?P<noun>{NOUN})"
)


def read_np(text: str) -> dict:
    m = NP.fullmatch(text)
    assert m, f"not a GenEval noun phrase: {text!r}"
    count, noun = WORDS[m["det"]], m["noun"]
    assert (count == 1) == (noun in P.CLASSES), f"number and noun disagree in {text!r}"
    if count == 1:  # GenEval's article: "an" before a vowel letter
        assert m["det"] == ("an" if text.split()[1][0] in "aeiou" else "a"), text
    e = {"class": SINGULAR[noun], "count": count}
    e.update({k: m[k] for k in ("color", "size") if m[k]})
    return e


def read_prompt(text: str) -> tuple[list[dict], str]:
    """(include, shape) read back from the text: shape is 'one', 'and' or 'rel'."""
    assert text.startswith("a photo of "), text
    body = text[len("a photo of ") :]
    m = re.fullmatch(r"(.+?) (left of|right of|above|below|and) (.+)", body)
    if not m:
        return [read_np(body)], "one"
    a, b = read_np(m[1]), read_np(m[3])
    if m[2] == "and":
        return [a, b], "and"
    return [b, {**a, "position": [m[2], 0]}], "rel"


SHAPES = {  # tag -> (shape, per entry: (count >= 2, has colour, has size))
    "single_object": ("one", [(False, False, False)]),
    "two_object": ("and", [(False, False, False)] * 2),
    "counting": ("one", [(True, False, False)]),
    "colors": ("one", [(False, True, False)]),
    "position": ("rel", [(False, False, False)] * 2),
    "color_attr": ("and", [(False, True, False)] * 2),
    "color_count": ("one", [(True, True, False)]),
    "color_position": ("rel", [(False, True, False)] * 2),
    "position_count": ("rel", [(False, False, False), (True, False, False)]),
    "position_size": ("rel", [(False, False, True)] * 2),
    "multi_count": ("and", [(True, False, False)] * 2),
}


def check_meta(m: dict, counts=(2, 4)):
    include, shape = read_prompt(m["prompt"])
    want_shape, entries = SHAPES[m["tag"]]
    assert shape == want_shape, m
    assert m["include"] == include, m  # what the evaluator checks is what the text says
    exclude = [{"class": e["class"], "count": e["count"] + 1} for e in include if e["count"] >= 2]
    assert m.get("exclude", []) == exclude and ("exclude" in m) == bool(exclude), m
    assert list(m) == ["tag", "include"] + (["exclude"] if exclude else []) + ["prompt"]  # GenEval's key order
    for e, (counted, colored, sized) in zip(include, entries, strict=True):
        assert (e["count"] >= 2) == counted and ("color" in e) == colored and ("size" in e) == sized, m
        assert e["count"] == 1 or counts[0] <= e["count"] <= counts[1], m
        assert not (colored and e["class"] == "person"), m  # GenEval writes no coloured person
    if len(include) == 2:
        assert include[0]["class"] != include[1]["class"], m
        for k in ("color", "size"):
            assert k not in include[0] or include[0][k] != include[1][k], m


# ------------------------------------------------------------------------------------------- tests


def test_wording_is_genevals_own():
    """Lines of GenEval's evaluation_metadata.jsonl, byte for byte (so --exclude of it matches by text)."""
    pos = [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]
    assert json.dumps(P.make_meta("position", pos)) == (
        '{"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, '
        '"position": ["left of", 0]}], "prompt": "a photo of a cat left of a dog"}'
    )
    assert json.dumps(P.make_meta("counting", [{"class": "bus", "count": 3}])) == (
        '{"tag": "counting", "include": [{"class": "bus", "count": 3}], "exclude": [{"class": "bus", "count": 4}], '
        '"prompt": "a photo of three buses"}'
    )
    said = {
        ("colors", ("orange", "orange")): "a photo of an orange orange",
        ("counting", ("sheep", 2)): "a photo of two sheeps",
        ("counting", ("knife", 4)): "a photo of four knifes",
        ("counting", ("hair drier", 2)): "a photo of two hair driers",
        ("single_object", ("skis",)): "a photo of a skis",
        ("single_object", ("oven",)): "a photo of an oven",
    }
    for (tag, args), text in said.items():
        e = {"class": args[0], "count": 1}
        if tag == "colors":
            e["color"] = args[1]
        elif tag == "counting":
            e["count"] = args[1]
        assert P.make_meta(tag, [e])["prompt"] == text
    assert len(P.CLASSES) == len(set(P.CLASSES)) == 80 and "tv remote" in P.CLASSES and "remote" not in P.CLASSES
    assert len(P.COLORS) == 10 and P.RELATIONS == ("left of", "right of", "above", "below")


def test_every_prompt_of_every_tag_says_what_its_metadata_says():
    sizes = {t: P.space_size(t) for t in P.TAGS}
    assert sizes["single_object"] == 80 and sizes["two_object"] == 80 * 79 and sizes["counting"] == 80 * 3
    assert sizes["colors"] == 79 * 10 and sizes["position"] == 80 * 79 * 4
    for t in P.TAGS:  # the space's ends and a seeded sample of its middle
        for m in [P.prompt_at(t, 0), P.prompt_at(t, sizes[t] - 1)] + P.generate(60, seed=5, mix={t: 1}):
            assert m["tag"] == t
            check_meta(m)
    with pytest.raises(IndexError):  # the index decodes onto exactly the listed space
        P.prompt_at("single_object", 80)
    # wider counts reach the number words up to ten
    wide = P.generate(400, seed=1, mix={"counting": 1, "multi_count": 1}, counts=(2, 10))
    for m in wide:
        check_meta(m, counts=(2, 10))
    assert max(e["count"] for m in wide for e in m["include"]) == 10


def test_same_seed_same_file_other_seed_differs(tmp_path, capsys):
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    assert run(["--num", "3000", "--seed", "7", "--out", str(a)], capsys)[0] == 0
    assert run(["--num", "3000", "--seed", "7", "--out", str(b)], capsys)[0] == 0
    assert run(["--num", "3000", "--seed", "8", "--out", str(c)], capsys)[0] == 0
    assert a.read_bytes() == b.read_bytes()
    one, other = a.read_text().splitlines(), c.read_text().splitlines()
    assert len(one) == len(other) == 3000 and len(set(one) & set(other)) < 1500  # a different draw, not a reorder


def test_size_and_mix_proportions_and_the_capped_tags_shortfall(capsys):
    metas = P.generate(3000, seed=0, mix={"position": 1, "color_attr": 2, "multi_count": 3})
    assert Counter(m["tag"] for m in metas) == {"position": 500, "color_attr": 1000, "multi_count": 1500}
    odd = P.generate(1001, seed=0, mix={"position": 1, "colors": 1, "multi_count": 1})
    assert len(odd) == 1001 and sorted(Counter(m["tag"] for m in odd).values()) == [333, 334, 334]
    # single_object holds 80 prompts: all of them, the rest goes to the other tag, and a note says so
    notes = []
    small = P.generate(1000, seed=0, mix={"single_object": 1, "position": 1}, notes=notes)
    assert Counter(m["tag"] for m in small) == {"single_object": 80, "position": 920}
    assert len({m["prompt"] for m in small if m["tag"] == "single_object"}) == 80
    assert any("single_object" in n and "80" in n for n in notes)
    # the default mix covers every tag
    assert set(Counter(m["tag"] for m in P.generate(2000))) == set(P.TAGS)


def test_no_duplicates_at_the_papers_size_and_the_trainer_accepts_the_file(tmp_path, capsys):
    out = tmp_path / "deep" / "train_prompts.jsonl"  # parent folders are created
    rc, stdout, _ = run(["--out", str(out)], capsys)  # the default: 50k, every tag
    assert rc == 0 and "50000 prompts" in stdout
    metas = lines(out)  # every line loads with the trainer's reader
    texts = [m["prompt"] for m in metas]
    assert len(texts) == 50000 == len(set(texts))
    assert [p.name for p in out.parent.iterdir()] == ["train_prompts.jsonl"]  # no temporary file left behind
    for t, n in Counter(m["tag"] for m in metas).items():
        assert re.search(rf"^\s+{t}\s+{n}$", stdout, re.M), (t, n)  # the summary's count per tag
    cfg = load_config(REPO / "configs" / "janus_pro_1b.yaml", [f"--data.prompts={out}"])
    assert validate.data_problems(cfg) == []  # the trainer's check of data.prompts, every line
    dup = P.generate(500, mix={"single_object": 1}, allow_duplicates=True)  # duplicates only when asked
    assert len(dup) == 500 and len({m["prompt"] for m in dup}) == 80


def test_exclude_removes_every_excluded_prompt(tmp_path, capsys):
    test_set = P.generate(3000, seed=1)
    assert len({m["prompt"] for m in test_set} & {m["prompt"] for m in P.generate(20000, seed=0)}) > 100
    held = tmp_path / "evaluation_metadata.jsonl"
    held.write_text("".join(json.dumps(m) + "\n" for m in test_set[:2000]))
    shouting = tmp_path / "more.jsonl"  # the same texts in other case and spacing, with a full stop
    shouting.write_text("".join(json.dumps({"prompt": f"  {m['prompt'].upper()}. "}) + "\n" for m in test_set[2000:]))
    out = tmp_path / "train.jsonl"
    argv = ["--num", "20000", "--out", str(out), "--exclude", str(held), "--exclude", str(shouting)]
    rc, stdout, _ = run(argv, capsys)
    assert rc == 0 and "3000 excluded texts" in stdout
    train = {m["prompt"] for m in lines(out)}
    assert len(train) == 20000 and not train & {m["prompt"] for m in test_set}
    # a tag whose every prompt is excluded: the note says so; asked for alone, it is an error naming its maximum
    every_single = tmp_path / "single.jsonl"
    every_single.write_text("".join(json.dumps(P.prompt_at("single_object", i)) + "\n" for i in range(80)))
    rc, stdout, _ = run(["--num", "500", "--out", str(out), "--exclude", str(every_single)], capsys)
    assert rc == 0 and "single_object: 80 of its 80 prompts excluded" in stdout
    assert not any(m["tag"] == "single_object" for m in lines(out))
    rc, _, err = run(["--mix", "single_object=1", "--num", "10", "--out", str(out), "--exclude", str(every_single)],
                     capsys)  # fmt: skip
    assert rc == 2 and "hold only 0 distinct prompts" in err and "single_object 0" in err


def test_bad_input_is_an_error_naming_the_problem(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    rc, _, err = run(["--mix", "single_object=1,positon=2", "--out", str(out)], capsys)
    assert rc == 2 and "unknown tag 'positon'" in err and "did you mean 'position'" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a photo of a cat"}\nnot json\n{"tag": "x"}\n')
    rc, _, err = run(["--exclude", str(bad), "--exclude", str(tmp_path / "missing.jsonl"), "--out", str(out)], capsys)
    assert rc == 2 and f"{bad}:2: not valid JSON" in err and f"{bad}:3:" in err and "missing.jsonl" in err
    rc, _, err = run(["--mix", "counting=1", "--num", "1000", "--out", str(out)], capsys)
    assert rc == 2 and "hold only 240 distinct prompts" in err and "counting 240" in err
    for argv, says in (
        (["--counts", "1-3"], "--counts '1-3'"),
        (["--counts", "4-2"], "--counts '4-2'"),
        (["--mix", "colors=-1"], "colors=-1"),
        (["--mix", "colors=0"], "at least one tag"),
        (["--num", "0"], "--num 0"),
    ):
        rc, _, err = run(argv + ["--out", str(out)], capsys)
        assert rc == 2 and says in err, (argv, err)
    assert not out.exists()  # nothing is written on an error
    with pytest.raises(ConfigError, match="did you mean 'colors'"):
        P.generate(10, mix={"color": 1})


def test_the_cli_in_a_fresh_process_writes_the_same_file(tmp_path, capsys):
    args = ["--num", "400", "--seed", "3", "--mix", "position=1,color_attr=1,counting=1", "--counts", "2-5"]
    here = tmp_path / "here.jsonl"
    assert run(args + ["--out", str(here)], capsys)[0] == 0
    there = tmp_path / "sub" / "there.jsonl"
    r = subprocess.run([sys.executable, "-m", "gvu.prompts", *args, "--out", str(there)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert there.read_bytes() == here.read_bytes()  # seeded by value, not by the process's hash seed
    assert "400 prompts" in r.stdout and re.search(r"^\s+counting\s+\d+$", r.stdout, re.M)


def test_the_real_model_configs_say_how_to_make_their_prompt_file():
    for config in ("janus_pro_1b.yaml", "janus_pro_7b.yaml", "xomni_7b.yaml", "xomni_7b_zero3.yaml"):
        text = (REPO / "configs" / config).read_text()
        assert "python -m gvu.prompts" in text and load_config(REPO / "configs" / config).data.prompts == (
            "data/train_prompts.jsonl"
        ), config
