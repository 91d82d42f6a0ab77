"""The intrinsic reward: geometric mean of the prompt's token probabilities given the image."""

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gvu.rewards import geometric_mean_reward, intrinsic_reward
from gvu.toy import prompts as WP
from gvu.toy import world as W
from gvu.toy.backend import ToyUMM

SHIPPED = Path(__file__).resolve().parents[2] / "gvu" / "assets" / "toy_umm"


def test_geometric_mean_hand_values():
    logp = torch.log(torch.tensor([[0.5, 0.125, 1.0], [0.25, 1.0, 1.0]]))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # (0.5 * 0.125) ** (1/2) = 0.25; 0.25 ** 1 = 0.25
    torch.testing.assert_close(geometric_mean_reward(logp, mask), torch.tensor([0.25, 0.25]))
    r = geometric_mean_reward(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert torch.isnan(r).all(), "a row with no scored token has no reward (NaN, left out of the advantages)"


def test_long_prompts_do_not_underflow():
    logp = torch.full((1, 400), -3.0)  # product of 400 probabilities of e^-3 underflows fp32; the mean does not
    assert geometric_mean_reward(logp, torch.ones(1, 400, dtype=torch.bool)).item() == pytest.approx(math.exp(-3))


@pytest.mark.parametrize("with_eos", [False, True])
def test_reward_equals_full_vocab_softmax_of_a_plain_forward(with_eos):
    """Independent check of the whole path: build the understanding sequence by hand, run the HF model, softmax
    over the full vocabulary, take the prompt tokens' probabilities, geometric mean; alone and batched."""
    adapter, model = ToyUMM.new_model(seed=1)
    model.eval()
    rng = random.Random(0)
    train, _ = WP.make_prompt_sets(0)
    metas = [train[i] for i in rng.sample(range(len(train)), 5)]
    codes = np.stack([W.sample_scene(m, rng) for m in metas])
    images = W.render(codes)
    prompts = adapter.tokenize_prompts([m["prompt"] for m in metas])
    batched = intrinsic_reward(adapter, model, torch.from_numpy(images), prompts, with_eos=with_eos)
    for i, m in enumerate(metas):
        ids = adapter.encode_text(m["prompt"]) + ([adapter.eos] if with_eos else [])
        layout = adapter.image_layout(torch.from_numpy(codes[i : i + 1]))[0].tolist()
        seq = [adapter.bos, adapter.boi, *layout, adapter.eoi, adapter.describe, *ids]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0].double()
        P = len(seq) - len(ids)
        lp = torch.log_softmax(logits[P - 1 : -1], -1).gather(-1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
        want = lp.mean().exp().item()
        alone = intrinsic_reward(
            adapter, model, torch.from_numpy(images[i : i + 1]), prompts[i : i + 1], with_eos=with_eos
        )
        assert alone.item() == pytest.approx(want, rel=1e-4)
        assert batched[i].item() == pytest.approx(want, rel=1e-4)


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped toy checkpoint is not built yet")
@pytest.mark.parametrize("kind", ["count", "color", "shape"])
def test_shipped_model_prefers_its_own_prompt_over_a_one_word_change(kind):
    """The paper's check: the reward of an image is higher for its own prompt than with one word changed."""
    adapter, model = ToyUMM.from_pretrained(str(SHIPPED))
    rng = random.Random(1)
    _, evals = WP.make_prompt_sets(0)
    true_p, false_p, imgs = [], [], []
    for m in evals:
        scene = W.sample_scene(m, rng)
        q = WP.perturb(m, kind, rng, image=scene)
        if q is not None:
            true_p.append(m["prompt"])
            false_p.append(q["prompt"])
            imgs.append(W.render(scene[None])[0])
    assert len(true_p) >= 20
    img = torch.from_numpy(np.stack(imgs))
    rt = intrinsic_reward(adapter, model, img, adapter.tokenize_prompts(true_p))
    rf = intrinsic_reward(adapter, model, img, adapter.tokenize_prompts(false_p))
    assert (rt > rf).float().mean().item() >= 0.8


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped toy checkpoint is not built yet")
def test_end_token_penalises_objects_the_prompt_does_not_name():
    """With the end token scored, adding an unnamed object to a scene lowers the reward (a hedge is not free)."""
    adapter, model = ToyUMM.from_pretrained(str(SHIPPED))
    rng = random.Random(2)
    _, evals = WP.make_prompt_sets(0)
    metas = [m for m in evals if m["tag"] in ("single_object", "colors", "counting")]
    exact, extra = [], []
    for m in metas:
        scene = W.sample_scene(m, rng)
        more = scene.copy()
        more[rng.choice([i for i in range(36) if scene[i] == 0])] = rng.randrange(1, W.NUM_CODES)
        exact.append(scene)
        extra.append(more)
    prompts = adapter.tokenize_prompts([m["prompt"] for m in metas])
    r_exact = intrinsic_reward(adapter, model, torch.from_numpy(W.render(np.stack(exact))), prompts, with_eos=True)
    r_extra = intrinsic_reward(adapter, model, torch.from_numpy(W.render(np.stack(extra))), prompts, with_eos=True)
    assert (r_exact > r_extra).float().mean().item() >= 0.8
