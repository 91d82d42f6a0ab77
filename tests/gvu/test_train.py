"""The trainer end to end on a tiny random toy UMM: parameters that must move do, resume is exact, outputs exist."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gvu.config import ConfigError, load_config
from gvu.toy.backend import ToyUMM

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "ckpt"
    adapter, model = ToyUMM.new_model(seed=0)
    adapter.save_pretrained(str(path), model)
    return path


def small_overrides(ckpt, out, steps):
    return [
        f"--model.path={ckpt}",
        f"--train.output_dir={out}",
        f"--train.steps={steps}",
        "--grpo.prompts_per_step=4",
        "--grpo.group_size=4",
        "--train.eval_before=false",
        "--train.eval_after=false",
        "--train.save_every=1",
        "--train.log_every=1",
    ]


def test_two_steps_change_every_trainable_parameter_and_no_frozen_one(tiny_ckpt, tmp_path):
    from gvu import engine as E
    from gvu import train
    from gvu.data import PromptSampler, load_prompt_sets
    from gvu.metrics import PhaseTimer

    cfg = load_config(None, small_overrides(tiny_ckpt, tmp_path, 2) + ["--optim.warmup_steps=0"])
    rank, world = E.init_distributed()
    adapter, model = E.build(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = E.make_engine(model, cfg, world)
    sampler = PromptSampler(load_prompt_sets(cfg.data)[0], cfg.grpo.prompts_per_step, 0, rank, world)
    for step in range(2):
        m, _ = train.train_step(engine, adapter, sampler.batch(step), cfg, step, rank, PhaseTimer())
        assert m["reward/group_std"] > 0, "all rewards equal: the test could not move anything"
    after = dict(engine.module.named_parameters())
    trainable = [n for n, p in after.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    unchanged = [n for n in trainable if torch.equal(before[n], after[n].detach())]
    assert not unchanged, f"trainable parameters that did not change: {unchanged}"
    moved = [n for n, p in after.items() if not p.requires_grad and not torch.equal(before[n], p.detach())]
    assert not moved, f"frozen parameters that changed: {moved}"


def test_second_update_reuses_the_first_updates_logprobs_as_old(tiny_ckpt, tmp_path, monkeypatch):
    # updates_per_rollout=2 over 2 micro-batches: update 0 runs at the rollout's weights (DeepSpeed steps once per
    # update), so its log-probs are update 1's old log-probs and no separate old-log-prob pass is needed.
    from gvu import engine as E
    from gvu import train
    from gvu.data import PromptSampler, load_prompt_sets
    from gvu.metrics import PhaseTimer

    cfg = load_config(
        None,
        small_overrides(tiny_ckpt, tmp_path, 1)
        + ["--optim.warmup_steps=0", "--grpo.updates_per_rollout=2", "--grpo.micro_batch_size=8", "--grpo.beta=0"],
    )
    rank, world = E.init_distributed()
    adapter, model = E.build(cfg)
    engine = E.make_engine(model, cfg, world)
    lora = [p for n, p in engine.module.named_parameters() if "lora_B" in n]
    calls, real_loss = [], train.grpo_loss

    def spy(logp, old_logp, *a, **k):
        calls.append((logp.detach().clone(), old_logp.clone(), torch.cat([p.detach().flatten() for p in lora])))
        return real_loss(logp, old_logp, *a, **k)

    monkeypatch.setattr(train, "grpo_loss", spy)
    passes = []
    real_lp = adapter.image_logprobs
    monkeypatch.setattr(adapter, "image_logprobs", lambda *a, **k: passes.append(1) or real_lp(*a, **k))
    sampler = PromptSampler(load_prompt_sets(cfg.data)[0], cfg.grpo.prompts_per_step, 0, rank, world)
    m, _ = train.train_step(engine, adapter, sampler.batch(0), cfg, 0, rank, PhaseTimer())
    assert len(calls) == 4 and len(passes) == 4, "2 updates x 2 micro-batches, and no extra old-log-prob pass"
    w0 = calls[0][2]
    for i in (0, 1):  # update 0: on-policy, at the rollout's weights
        assert torch.equal(calls[i][0], calls[i][1]) and torch.equal(calls[i][2], w0)
    for i in (2, 3):  # update 1: old = update 0's log-probs of the same rows, new ones from the stepped weights
        assert torch.equal(calls[i][1], calls[i - 2][0])
        assert not torch.equal(calls[i][2], w0)
        assert not torch.allclose(calls[i][0], calls[i][1])
    assert m["ratio"] != 1.0


def run_train(overrides, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "gvu" / "train.py"), *overrides], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def test_resume_continues_with_the_same_next_step(tiny_ckpt, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(small_overrides(tiny_ckpt, straight, 3), tmp_path)
    run_train(small_overrides(tiny_ckpt, resumed, 2), tmp_path)
    proc = run_train(small_overrides(tiny_ckpt, resumed, 3), tmp_path)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    a, b = metrics(straight), metrics(resumed)
    assert sorted(b) == [1, 2, 3], "metrics.jsonl must hold each step once after a resume"
    for key in ("loss", "kl", "reward/mean", "lr"):
        assert a[3][key] == pytest.approx(b[3][key], rel=1e-5, abs=1e-9), key
    from safetensors.torch import load_file

    wa = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)


def test_adapter_loads_with_peft_and_config_is_saved(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    run_train(small_overrides(tiny_ckpt, out, 2) + ["--train.keep_checkpoints=1"], tmp_path)
    from peft import PeftModel

    _, base = ToyUMM.from_pretrained(str(tiny_ckpt))
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    assert load_config(out / "config.yaml").grpo.group_size == 4
    assert [p.name for p in (out / "checkpoints").glob("step*")] == ["step2"]


def test_bad_override_fails_before_anything_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "gvu" / "train.py"), "--grpo.loss_type=ppo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "grpo.loss_type must be one of" in proc.stderr


def test_profile_writes_a_trace_with_the_phases(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    proc = run_train(small_overrides(tiny_ckpt, out, 5) + ["--train.profile=true"], tmp_path)
    traces = list((out / "profile").glob("*.pt.trace.json"))
    assert traces, "no torch.profiler trace written"
    text = traces[0].read_text()
    for phase in ("gvu/rollout", "gvu/reward", "gvu/backward"):
        assert phase in text
    assert "phase" in proc.stdout and "rollout" in proc.stdout


def test_lora_on_the_output_head_is_refused(tiny_ckpt, tmp_path):
    # the log-prob kernels read lm_head.weight directly, so a LoRA on the head would be silently skipped
    with pytest.raises(ConfigError, match="lm_head"):
        load_config(None, small_overrides(tiny_ckpt, tmp_path, 1) + ["--lora.target_modules=[q_proj,lm_head]"])


def test_lr_schedule_warms_up_then_stays_constant_or_follows_the_cosine_to_its_floor():
    from gvu import engine as E

    const = E.lr_lambda(load_config(None, ["--optim.warmup_steps=10", "--train.steps=110"]))
    assert const(0) == pytest.approx(0.1) and const(9) == 1.0 and const(109) == 1.0
    cos = E.lr_lambda(load_config(None, ["--optim.warmup_steps=10", "--train.steps=110", "--optim.schedule=cosine"]))
    assert cos(9) == 1.0 and cos(10) == 1.0
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)  # floor: optim.min_lr_ratio
    vals = [cos(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, ["--optim.schedule=linear"])


def test_factorised_image_head_update_trains_is_off_in_the_reference_and_reloads(tiny_ckpt, tmp_path):
    from peft import PeftModel

    from gvu import checkpoint, train
    from gvu import engine as E
    from gvu.data import PromptSampler, load_prompt_sets
    from gvu.metrics import PhaseTimer
    from gvu.models import adapter_disabled, load_policy_updates, policy_updates

    cfg = load_config(
        None, small_overrides(tiny_ckpt, tmp_path, 2) + ["--optim.warmup_steps=0", "--lora.image_head=factorised"]
    )
    rank, world = E.init_distributed()
    adapter, model = E.build(cfg)
    (update,) = policy_updates(model).values()
    head = model.get_output_embeddings()
    base_weight = head.parametrizations.weight.original.detach().clone()
    engine = E.make_engine(model, cfg, world)
    sampler = PromptSampler(load_prompt_sets(cfg.data)[0], cfg.grpo.prompts_per_step, 0, rank, world)
    for step in range(2):
        train.train_step(engine, adapter, sampler.batch(step), cfg, step, rank, PhaseTimer())
    assert update.table.abs().sum() > 0, "the image-head update did not train"
    assert torch.equal(head.parametrizations.weight.original, base_weight), "the base head must stay frozen"
    rows = slice(adapter.code_offset, adapter.code_offset + adapter.num_codes)
    assert not torch.equal(head.weight[rows], base_weight[rows])
    assert torch.equal(head.weight[: adapter.code_offset], base_weight[: adapter.code_offset])  # words untouched
    with adapter_disabled(engine):
        assert torch.equal(head.weight, base_weight)  # the reference policy is the base's head
    assert update.enabled

    checkpoint.save_checkpoint(engine, tmp_path / "run", 2, {}, True, 1)  # what the trainer writes
    out = tmp_path / "run" / "adapter"
    assert (out / "policy_updates.safetensors").exists()
    _, base = ToyUMM.from_pretrained(str(tiny_ckpt))
    loaded = PeftModel.from_pretrained(base, str(out))
    adapter.add_image_head_update(loaded)
    load_policy_updates(loaded, out)
    ids = torch.randint(0, adapter.vocab_size, (2, 12))
    engine.module.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, engine.module(input_ids=ids).logits)


def test_factorised_image_head_update_is_refused_under_zero3(tiny_ckpt, tmp_path):
    from gvu import validate

    cfg = load_config(
        None,
        small_overrides(tiny_ckpt, tmp_path, 1)
        + ["--lora.image_head=factorised", "--train.deepspeed=configs/ds_zero3.json"],
    )
    with pytest.raises(ConfigError, match="ZeRO-3"):
        validate.check(cfg)
