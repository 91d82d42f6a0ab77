"""Rewards by name (gvu/rewards/): the registry, the two mixing modes with NaN rows, each built-in reward against a
plain forward on tiny backends, the configuration check, and a short trainer run logging two rewards."""

import math
import random

import numpy as np
import pytest
import torch

import kernels
from gvu import rewards as R
from gvu import validate
from gvu.config import ConfigError, load_config
from gvu.rewards import qa
from gvu.testing import read_metrics, run_trainer, small_run, tiny_backend, tiny_toy_checkpoint
from gvu.toy import prompts as WP
from gvu.toy import world as W

G = 4


def grpo(*over):
    return load_config(None, ["--grpo.group_size=4", *over]).grpo


# ----------------------------------------------------------------------------------------------- registry, mixing


def test_a_registered_user_reward_is_scored_by_name_and_names_are_checked():
    @R.register_reward("test_constant")
    def constant(backend, model, images, codes, prompts, metas, cfg):
        return torch.arange(len(metas), dtype=torch.float32)

    try:
        assert "test_constant" in R.reward_names()
        with pytest.raises(ValueError, match="already registered"):
            R.register_reward("test_constant")(constant)
        cfg = load_config(None, ["--grpo.rewards=[{name: test_constant, weight: 2.0}]"])
        scores = R.score(None, None, np.zeros((3, 2, 2, 3), np.uint8), torch.zeros(3, 1), None, [{}] * 3, cfg)
        assert list(scores) == ["test_constant"] and torch.equal(scores["test_constant"], torch.tensor([0.0, 1, 2]))
    finally:
        R.registry._REGISTRY.pop("test_constant")
    with pytest.raises(KeyError, match=r"did you mean 'qa'.*registered: \["):
        R.get_reward("qaa")


def test_mixing_the_sum_of_rewards_leaves_a_row_nan_in_any_weighted_reward_out():
    a = torch.tensor([0.1, 0.5, float("nan"), 0.9, 0.2, 0.2, 0.3, 0.4])
    b = torch.tensor([1.0, 0.0, 1.0, 1.0, float("nan"), 0.0, 1.0, 0.0])
    logged = torch.full((8,), float("nan"))  # weight 0: logged only, so its NaNs leave nothing out
    g = grpo("--grpo.rewards=[{name: gvu, weight: 1.0}, {name: qa, weight: 0.5}, {name: oracle, weight: 0}]")
    scores = {"gvu": a, "qa": b, "oracle": logged}
    want = kernels.group_advantages(a + 0.5 * b, 4, eps=g.adv_eps)
    adv = R.advantages(scores, g)
    torch.testing.assert_close(adv, want, equal_nan=True)
    assert adv[2] == 0 and adv[4] == 0 and bool(adv[[0, 1, 3, 5, 6, 7]].ne(0).all())
    m = R.metrics(scores, g)
    assert m["reward/mean"] == pytest.approx(torch.nanmean(a + 0.5 * b).item())
    assert m["reward/qa/nan"] == 1 / 8 and m["reward/oracle/nan"] == 1.0 and math.isnan(m["reward/oracle/mean"])
    assert m["reward/gvu/mean"] == pytest.approx(torch.nanmean(a).item())


def test_mixing_the_sum_of_advantages_leaves_a_nan_row_out_of_that_reward_only():
    a = torch.tensor([0.1, 0.5, float("nan"), 0.9, 0.2, 0.2, 0.3, 0.4])
    b = torch.tensor([1.0, 0.0, 1.0, 1.0, float("nan"), 0.0, 1.0, 0.0])
    g = grpo("--grpo.rewards=[{name: gvu, weight: 1.0}, {name: qa, weight: 0.5}]", "--grpo.reward_mix=advantages")
    adv = R.advantages({"gvu": a, "qa": b}, g)
    ga, gb = (kernels.group_advantages(x, 4, eps=g.adv_eps) for x in (a, b))
    torch.testing.assert_close(adv, ga + 0.5 * gb)
    # row 2 is NaN for gvu only: qa still moves it, and gvu's group statistics are those of rows 0, 1, 3
    assert adv[2] == 0.5 * gb[2] != 0 and ga[2] == 0
    three = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(ga[[0, 1, 3]], (three - three.mean()) / (three.std() + g.adv_eps))
    assert torch.isfinite(adv).all()


def test_the_default_is_gvu_alone_summed_which_is_todays_advantage():
    g = load_config(None, []).grpo
    assert g.rewards == [{"name": "gvu", "weight": 1.0}] and g.reward_mix == "rewards"
    r = torch.rand(16).masked_fill(torch.arange(16) == 3, float("nan"))
    want = kernels.group_advantages(r, g.group_size, eps=g.adv_eps, scale=g.scale_rewards)
    assert torch.equal(R.advantages({"gvu": r}, g), want)


# ----------------------------------------------------------------------------------------------- each reward


@pytest.fixture(scope="module")
def toy():
    backend, model = tiny_backend("toy", "unused")
    return backend, model


def scene_rows(metas, seed=0):
    rng = random.Random(seed)
    codes = np.stack([W.sample_scene(m, rng) for m in metas])
    return W.render(codes), torch.from_numpy(codes)


def test_qa_on_the_toy_is_the_mean_probability_of_the_prompts_slot_words_from_a_plain_forward(toy):
    backend, model = toy
    metas = [WP.make_meta("color_count", [{"class": "star", "count": 3, "color": "red"}]),
             WP.make_meta("position", [{"class": "circle", "count": 1}, {"class": "heart", "count": 1,
                                                                          "position": ["left of", 0]}])]  # fmt: skip
    images, codes = scene_rows(metas)
    got = R.get_reward("qa").fn(backend, model, images, codes, None, metas, None)
    assert qa.questions(metas[0], free_text=False) == [
        ("a photo of", "three"), ("a photo of three", "red"), ("a photo of three red", "stars")
    ]  # fmt: skip
    for i, m in enumerate(metas):
        probs = []
        for q, a in qa.questions(m, free_text=False):
            q_ids, a_ids = backend.encode_text(q), backend.encode_text(a)
            prefix = backend._understanding_prefix(codes[i : i + 1])[0].tolist() + q_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prefix + a_ids])).logits[0].double()
            lp = torch.log_softmax(logits[len(prefix) - 1 : -1], -1).gather(1, torch.tensor(a_ids)[:, None])
            probs.append(lp.sum().exp().item())
        assert got[i].item() == pytest.approx(float(np.mean(probs)), rel=1e-4)
    assert len(qa.questions(metas[1], False)) == 3  # circle, heart, "left of"


def test_qa_is_nan_for_a_prompt_outside_genevals_wording_and_oracle_is_the_exact_evaluator(toy):
    backend, model = toy
    good = WP.make_meta("colors", [{"class": "circle", "count": 1, "color": "blue"}])
    bare = {"prompt": "a photo of a blue circle"}  # no include: nothing to ask
    images, codes = scene_rows([good, good])
    r = R.get_reward("qa").fn(backend, model, images, codes, None, [good, bare], None)
    assert 0 < r[0] < 1 and torch.isnan(r[1])
    wrong = WP.make_meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
    o = R.get_reward("oracle").fn(backend, model, images, codes, None, [good, wrong], None)
    assert o.tolist() == [1.0, 0.0] and o.dtype == torch.float32


@pytest.mark.parametrize("name", ["janus", "xomni"])
def test_yes_prob_is_the_two_answer_softmax_ratio_of_a_plain_forward(name, tmp_path):
    backend, model = tiny_backend(name, str(tmp_path))
    prompts = backend.tokenize_prompts(["a photo of a red dog", "two cats"])
    images = backend.decode(backend.generate(model, prompts, 1, load_config(None, ["--sampling.greedy=true"]).sampling))
    r = R.get_reward("yes_prob").fn(backend, model, images, torch.zeros(2, 1), prompts, [{}] * 2, None)
    assert r.dtype == torch.float32 and r.shape == (2,) and bool(((r > 0) & (r < 1)).all())
    yes, no = (backend.tokenize_prompts([w]).ids[0, -1].item() for w in (qa.YES, qa.NO))
    for i, text in enumerate(prompts.texts):
        u = backend.understanding_inputs(images[i : i + 1], backend.tokenize_prompts([qa.YES]),
                                         question=qa.YES_PROB_QUESTION.format(prompt=text))  # fmt: skip
        with torch.no_grad():
            p = model(input_ids=u.input_ids, **u.forward_kwargs).logits[0, -2].double().softmax(-1)
        assert r[i].item() == pytest.approx((p[yes] / (p[yes] + p[no])).item(), rel=1e-4)


# ----------------------------------------------------------------------------------------------- configuration


def problems(overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate.check(load_config(None, overrides))
    return "\n".join(e.value.problems)


def test_config_errors_name_the_reward_the_backend_and_the_fix(tmp_path):
    got = problems(["--grpo.rewards=[{name: gvuu, weight: 1.0}]"])
    assert "'gvuu'" in got and "did you mean 'gvu'" in got and "registered: [" in got
    got = problems(["--grpo.rewards=[{name: yes_prob, weight: 1.0}]"])
    assert "yes_prob" in got and "model.backend='toy'" in got and "questions" in got and "captions" in got
    got = problems(["--model.backend=janus", "--grpo.rewards=[{name: oracle, weight: 1.0}]"])
    assert "oracle" in got and "model.backend='janus'" in got
    with pytest.raises(ConfigError, match="finite"):
        validate.load_checked(None, ["--grpo.rewards=[{name: gvu, weight: .inf}]"])
    with pytest.raises(ConfigError, match="at least one reward"):
        validate.load_checked(None, ["--grpo.rewards=[]"])
    with pytest.raises(ConfigError, match="reward_mix must be one of"):
        load_config(None, ["--grpo.reward_mix=mean"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a photo of a red circle"}\n')
    got = problems([f"--data.prompts={prompts}", "--grpo.rewards=[{name: gvu}, {name: qa, weight: 0.5}]"])
    assert "qa read the prompts' GenEval metadata" in got and "include" in got
    validate.check(load_config(None, ["--grpo.rewards=[{name: gvu}, {name: qa, weight: 0.5}, {name: oracle}]"]))


# ----------------------------------------------------------------------------------------------- trainer


def test_a_short_run_with_two_rewards_logs_both_and_the_mix(tmp_path):
    ckpt = tiny_toy_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "run"
    two = "--grpo.rewards=[{name: gvu, weight: 1.0}, {name: qa, weight: 0.5}, {name: oracle, weight: 0}]"
    proc = run_trainer(small_run(ckpt, out, 1, two, "--grpo.reward_mix=advantages"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for row in read_metrics(out).values():
        for name in ("gvu", "qa", "oracle"):
            assert math.isfinite(row[f"reward/{name}/mean"]) and row[f"reward/{name}/nan"] == 0
        assert row["reward/mean"] == pytest.approx(row["reward/gvu/mean"] + 0.5 * row["reward/qa/mean"], rel=1e-5)
        assert math.isfinite(row["loss"])
