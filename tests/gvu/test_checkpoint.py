"""Checkpoints hold what trains: their size follows the trained parameters, not the model, under ZeRO-2 and ZeRO-3,
and loading one into a fresh engine restores the trained weights and the optimizer state exactly."""

import pytest
import torch

from gvu import checkpoint
from gvu import engine as E
from gvu.config import load_config
from gvu.testing import small_run, tiny_toy_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt")


def engine_after(steps: int, ckpt, out, zero: int, r: int):
    """A one-rank engine of the toy policy (LoRA r) after `steps` real GRPO steps -> (engine, trained params)."""
    from gvu import train
    from gvu.data import PromptSampler, load_prompt_sets
    from gvu.metrics import PhaseTimer

    cfg = load_config(
        None,
        small_run(
            ckpt, out, 1, f"--lora.r={r}", "--lora.image_head=none", f"--train.deepspeed=configs/ds_zero{zero}.json"
        ),
    )
    rank, world = E.init_distributed()
    torch.manual_seed(0)
    backend, model = E.build(cfg)
    engine = E.make_engine(model, cfg, world)
    sampler = PromptSampler(load_prompt_sets(cfg.data)[0], cfg.grpo.prompts_per_step, 0, rank, world)
    for step in range(steps):
        train.train_step(engine, backend, sampler.batch(step), cfg, step, rank, PhaseTimer())
    return engine, sum(numel(p) for p in engine.module.parameters() if p.requires_grad)


def numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions parameters: their full size is ds_numel


def folder_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("zero", [2, 3])
def test_size_follows_the_trained_parameters_and_resume_restores_them(ckpt, tmp_path, zero):
    sizes, trained = {}, {}
    for r in (4, 16):
        engine, trained[r] = engine_after(1, ckpt, tmp_path / f"r{r}", zero, r)
        checkpoint.save_checkpoint(engine, tmp_path / f"r{r}", 1, {}, True, 2)
        sizes[r] = folder_bytes(tmp_path / f"r{r}" / "checkpoints" / "step1")
    frozen_bytes = 4 * sum(numel(p) for p in engine.module.parameters() if not p.requires_grad)
    # fp32 weights + fp32 master + Adam's two moments: ~16 bytes a trained parameter, plus a fixed overhead
    per_param = (sizes[16] - sizes[4]) / (trained[16] - trained[4])
    assert 8 <= per_param <= 20, per_param
    assert sizes[4] - per_param * trained[4] < 0.25 * frozen_bytes, "the frozen base must not be in the checkpoint"

    fresh, _ = engine_after(2, ckpt, tmp_path / "fresh", zero, 16)  # other weights and optimizer state
    state = checkpoint.resume(fresh, tmp_path / "r16", 1)
    assert state["step"] == 1
    from gvu.models import gathered

    a = [p for p in engine.module.parameters() if p.requires_grad]
    b = [p for p in fresh.module.parameters() if p.requires_grad]
    with gathered(*a, *b):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), "trained weights restored exactly"
