"""GenEval export: the official folder layout, atomic and resumable, for the toy and the Janus backends."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gvu import geneval
from gvu.toy import prompts as WP
from gvu.toy.backend import ToyUMM


def write_inputs(tmp_path: Path, backend: str, ckpt: Path, prompts: list[str]):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{backend: {backend}, path: {ckpt}}}\nsampling: {{cfg_scale: 2.0, top_k: 8}}\n")
    lines = [json.dumps({"tag": "t", "include": [{"class": "x", "count": 1}], "prompt": p}) for p in prompts]
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("\n".join(lines) + "\n")
    return cfg, meta, lines


def check_layout(out: Path, lines: list[str], samples: int, size: int):
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}" for i in range(len(lines))]
    for i, line in enumerate(lines):
        folder = out / f"{i:05d}"
        assert (folder / "metadata.jsonl").read_text() == line + "\n"
        pngs = sorted(p.name for p in (folder / "samples").iterdir())
        assert pngs == [f"{k:04d}.png" for k in range(samples)]
        im = Image.open(folder / "samples" / pngs[0])
        assert im.size == (size, size) and im.mode == "RGB"


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "ckpt"
    adapter, model = ToyUMM.new_model(seed=0)
    adapter.save_pretrained(str(path), model)
    return path


def test_toy_export_layout_resume_and_determinism(toy_ckpt, tmp_path, capsys):
    prompts = [m["prompt"] for m in WP.make_prompt_sets(0)[1][:3]]
    cfg, meta, lines = write_inputs(tmp_path, "toy", toy_ckpt, prompts)
    out = tmp_path / "gen"
    args = ["--config", str(cfg), "--metadata", str(meta), "--out", str(out), "--samples", "2", "--batch", "2"]
    assert geneval.main(args) == 0
    check_layout(out, lines, 2, ToyUMM.image_size)
    first = np.asarray(Image.open(out / "00002" / "samples" / "0001.png"))
    mtime = (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns
    # a killed run leaves an unfinished prompt folder missing and maybe a temp folder: only that prompt is redone,
    # with the same images (batches of 2: prompt 2 was alone in its batch, seeded by its own index)
    shutil.rmtree(out / "00002")
    (out / ".00002.crashed").mkdir()
    assert geneval.main(args) == 0
    assert "(1 written now)" in capsys.readouterr().out
    assert (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns == mtime
    assert np.array_equal(np.asarray(Image.open(out / "00002" / "samples" / "0001.png")), first)
    shutil.rmtree(out / ".00002.crashed")
    check_layout(out, lines, 2, ToyUMM.image_size)


def test_bad_inputs_give_an_error_code(toy_ckpt, tmp_path, capsys):
    cfg, meta, _ = write_inputs(tmp_path, "toy", toy_ckpt, ["a red circle"])
    meta.write_text('{"tag": "t"}\n')
    assert geneval.main(["--config", str(cfg), "--metadata", str(meta), "--out", str(tmp_path / "o")]) == 2
    assert "'prompt'" in capsys.readouterr().err


def test_janus_export(tmp_path):
    from gvu.testing import make_tiny_janus

    words = "a photo of red blue dog cat two".split()
    ckpt = make_tiny_janus(str(tmp_path / "janus"), words, seed=0)
    cfg, meta, lines = write_inputs(tmp_path, "janus", ckpt, ["a photo of a red dog", "two blue cats"])
    out = tmp_path / "gen"
    args = ["--config", str(cfg), "--metadata", str(meta), "--out", str(out), "--samples", "2", "--batch", "2"]
    assert geneval.main(args) == 0
    check_layout(out, lines, 2, 32)
