"""Our KV-cache rollout against transformers `generate` (bench/rollout.py's baseline): greedy tokens are identical."""

import importlib.util
from pathlib import Path

import pytest
import torch

from gvu.rollout import SamplingConfig
from gvu.toy.backend import ToyUMM

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a photo of a red circle", "a photo of three stars", "a photo of a blue square left of a green heart"]


def load_bench_rollout():
    spec = importlib.util.spec_from_file_location("gvu_bench_rollout", REPO / "bench" / "rollout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def toy():
    adapter, model = ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    with torch.no_grad():  # random init gives near-uniform logits; a larger head makes argmax meaningful
        model.lm_head.weight.mul_(20)
    model.eval()
    return adapter, model


@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_generate_equals_hf_generate_with_layout_processor(toy, num_samples):
    adapter, model = toy
    bench = load_bench_rollout()
    prompts = adapter.tokenize_prompts(PROMPTS)  # three lengths: left padding is exercised
    ours = adapter.generate(model, prompts, num_samples, SamplingConfig(greedy=True))
    hf = bench.hf_generate(adapter, model, prompts, num_samples, greedy=True)
    assert hf.shape == ours.shape == (3 * num_samples, adapter.image_len)
    assert torch.equal(ours, hf)
    assert len(set(ours.flatten().tolist())) > 3  # not a degenerate constant image


def test_sampled_hf_generate_gives_valid_codes(toy):
    adapter, model = toy
    bench = load_bench_rollout()
    codes = bench.hf_generate(adapter, model, adapter.tokenize_prompts(PROMPTS[:2]), 4, greedy=False, seed=1)
    assert codes.shape == (8, adapter.image_len)
    assert int(codes.min()) >= 0 and int(codes.max()) < adapter.num_codes  # codes only; <eor> checked inside
