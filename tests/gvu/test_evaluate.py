"""Evaluation: generation scores through read-back, understanding checks with oracle and toy models, tables."""

import random

import numpy as np
import pytest
import torch

from gvu.evaluate import format_table
from gvu.models.base import PromptBatch
from gvu.toy import prompts as WP
from gvu.toy import world as W
from gvu.toy.backend import ToyUMM
from gvu.toy.evaluator import generation_scores, understanding_scores
from gvu.toy.questions import caption_facts


class OracleAdapter:
    """Generates a correct scene for even-indexed prompts and an empty image otherwise; its 'understanding'
    knows the truth (log-prob 0 for true prompts, -5 per word for false) and captions with the true prompt."""

    def __init__(self, metas):
        self.by_text = {m["prompt"]: m for m in metas}
        self.rng = random.Random(0)
        self.order = {m["prompt"]: i for i, m in enumerate(metas)}
        self.truth = {}

    def tokenize_prompts(self, texts, device=None):
        ids, mask = torch.ones(len(texts), 3, dtype=torch.long), torch.ones(len(texts), 3, dtype=torch.bool)
        return PromptBatch(ids, mask, list(texts), ids, mask)

    def generate(self, model, prompts, num_samples, sampling, generator=None):
        out = []
        for t in prompts.texts:
            m = self.by_text[t]
            for _ in range(num_samples):
                good = self.order[t] % 2 == 0
                out.append(W.sample_scene(m, self.rng) if good else np.zeros(36, np.int64))
        return torch.from_numpy(np.stack(out))

    def decode(self, codes):
        return W.render(codes.numpy())

    def caption(self, model, images, greedy=True):
        return [self.truth[W.read_image(im).tobytes()] for im in np.asarray(images)]

    def prompt_logprobs(self, model, images, prompts, *, with_eos=False):
        codes = W.read_image(np.asarray(images))
        ok = torch.tensor([W.evaluate(WP.parse_prompt(t), c) for t, c in zip(prompts.texts, codes, strict=True)])
        logp = torch.where(ok[:, None], torch.zeros(len(ok), 3), torch.full((len(ok), 3), -5.0))
        return logp, prompts.mask


class Stub(torch.nn.Module):
    def eval(self):
        return self


@pytest.fixture
def metas():
    _, ev = WP.make_prompt_sets(0)
    return ev


def test_generation_scores_read_back_and_stderr(metas):
    adapter = OracleAdapter(metas)
    s = generation_scores(adapter, Stub(), metas, samples_per_prompt=2, batch_size=10)
    assert s["n"] == 2 * len(metas) and s["n_prompts"] == len(metas)
    assert s["per_prompt"] == [float(i % 2 == 0) for i in range(len(metas))]
    assert set(s["per_tag"]) == set(W.TAGS)
    want = np.mean([np.mean([i % 2 == 0 for i, m in enumerate(metas) if m["tag"] == t]) for t in W.TAGS])
    assert s["overall"] == pytest.approx(want)
    assert 0 < s["stderr"] < 0.2  # clustered by prompt: per-prompt means vary 0/1


def test_understanding_scores_oracle(metas):
    adapter = OracleAdapter(metas)
    # the oracle captions a scene with its own prompt: the scorer samples scenes from Random(seed) in order
    rng = random.Random(0)
    adapter.truth = {W.sample_scene(m, rng).tobytes(): m["prompt"] for m in metas}
    u = understanding_scores(adapter, Stub(), metas, seed=0, batch_size=50)
    assert u["caption_acc"] == 1.0
    # its captions are the prompts, which name a colour and a relation only where their tags do
    named = [caption_facts(m["prompt"], m) for m in metas]
    assert u["caption_exact"] == pytest.approx(np.mean([s == f for s, f in named])) and 0 < u["caption_exact"] < 1
    assert set(u["ranking"]) == set(W.PERTURB_KINDS)
    assert all(v == 1.0 for v in u["ranking"].values())
    assert u["ranking_n"]["shape"] == len(metas) and u["ranking_n"]["position"] < len(metas)


def test_understanding_scores_toy_model_runs(metas):
    adapter, model = ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    u = understanding_scores(adapter, model, metas[:20], seed=0)
    assert 0 <= u["caption_acc"] <= 1 and all(0 <= v <= 1 for v in u["ranking"].values())
    assert 0 <= u["caption_exact"] <= u["caption_acc"]
    g = generation_scores(adapter, model, metas[:6], samples_per_prompt=2, seed=0)
    assert 0 <= g["overall"] <= 1


def test_format_table_paired_and_single(metas):
    adapter = OracleAdapter(metas)
    before = generation_scores(adapter, Stub(), metas, samples_per_prompt=1)
    after = dict(before, per_prompt=[1.0] * len(metas))
    after["per_tag"] = {t: 1.0 for t in before["per_tag"]}
    after["per_tag_stderr"] = {t: 0.0 for t in before["per_tag"]}
    after["overall"], after["stderr"] = 1.0, 0.0
    table = format_table(before, after)
    assert "overall" in table and "color_position" in table and "+0.5" in table
    assert "overall" in format_table(before)


class _Logits(torch.nn.Module):
    """A stand-in understanding: logits favour the given token at each position (`favour[i][pos] = token id`)."""

    def __init__(self, vocab: int, favour: list[dict]):
        super().__init__()
        self.w, self.vocab, self.favour = torch.nn.Parameter(torch.zeros(1)), vocab, favour

    def forward(self, input_ids, **kw):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i, f in enumerate(self.favour):
            for pos, tok in f.items():
                logits[i, pos, tok] = 10.0
        return type("Out", (), {"logits": logits})()


def test_imbalance_counts_correct_images_misread_and_wrong_images_read_as_matching():
    from gvu.toy.evaluator import choices, format_imbalance, imbalance, read_as_matching, reading_counts

    backend = ToyUMM()
    meta = WP.make_meta("colors", [{"class": "star", "count": 1, "color": "red"}])
    assert choices(meta) == [("a photo of a", list(W.COLORS), W.COLORS.index("red")),
                             ("a photo of a red", list(W.SHAPES), W.SHAPES.index("star"))]  # fmt: skip
    rng = random.Random(0)
    right = W.sample_scene(meta, rng)
    wrong = W.sample_scene(WP.make_meta("colors", [{"class": "star", "count": 1, "color": "blue"}]), rng)
    images = W.render(np.stack([right, right, wrong, wrong]))
    # each row's understanding answers "red" or "blue" at the colour slot and "star" at the shape slot
    u = backend.understanding_inputs(images, backend.tokenize_prompts([meta["prompt"]] * 4))
    P = u.input_ids.shape[1] - u.targets.shape[1]
    red, blue, star = (backend.encode_text(w)[0] for w in ("red", "blue", "star"))
    says = ["red", "blue", "blue", "red"]  # read right, misread, read right, read as matching although wrong
    model = _Logits(backend.vocab_size, [{P - 1 + 4: red if s == "red" else blue, P - 1 + 5: star} for s in says])
    read = read_as_matching(backend, model, [meta] * 4, images)
    assert read == [True, False, False, True]
    correct = [float(W.evaluate(meta, im)) for im in images]
    assert correct == [1.0, 1.0, 0.0, 0.0]
    counts = reading_counts(correct, read)
    assert counts == (2, 1, 2, 1)
    other = WP.make_meta("single_object", [{"class": "circle", "count": 1}])
    result = imbalance([meta, other], [counts, (3, 0, 0, 0)])
    assert result["per_tag"]["colors"] == {"correct_misread": 0.5, "wrong_read_ok": 0.5, "n_correct": 2, "n_wrong": 2}
    assert result["per_tag"]["single_object"]["wrong_read_ok"] is None  # no wrong image: no fraction
    assert result["overall"] == {"correct_misread": 0.2, "wrong_read_ok": 0.5, "n_correct": 5, "n_wrong": 2}
    assert "0.200 of 5" in format_imbalance(result)


def test_the_shapes_evaluation_reports_the_imbalance(tmp_path):
    from gvu.config import load_config
    from gvu.toy.evaluator import ShapesEvaluator

    backend, model = ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    _, evals = WP.make_prompt_sets(0)
    metas = evals[::40][:4]
    cfg = load_config(None, ["--train.eval_samples=2"])
    res = ShapesEvaluator().evaluate(backend, model.eval(), metas, cfg, 0, 1)
    imb = res["imbalance"]
    assert imb["overall"]["n_correct"] + imb["overall"]["n_wrong"] == 8
    assert set(imb["per_tag"]) == {m["tag"] for m in metas}
    assert "imbalance" in ShapesEvaluator().summary("base", res)
