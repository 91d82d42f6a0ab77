"""Joint RL (gvu/joint.py, gvu/toy/questions.py): questions with exact answers, the answer policy, rewards,
advantages, the loss and its gradient, the config check, a short trainer run, determinism, and that off is inert."""

import random

import numpy as np
import pytest
import torch

import kernels
from gvu import joint as J
from gvu import validate
from gvu.config import ConfigError, load_config
from gvu.testing import read_metrics, run_trainer, small_run, tiny_toy_checkpoint
from gvu.toy import prompts as WP
from gvu.toy import world as W
from gvu.toy.backend import ToyUMM
from gvu.toy.questions import ToyQuestions, facts


@pytest.fixture(scope="module")
def train_metas():
    return WP.make_prompt_sets(0)[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt")


def test_draws_follow_the_softmax_over_each_questions_choices():
    scores = torch.tensor([[0.0, 1.0, 2.0, float("-inf")], [3.0, -1.0, 0.5, 0.0]])
    for T in (1.0, 2.0):
        logp = J.policy_logprobs(scores, T)
        want = torch.softmax(scores / T, 1)
        torch.testing.assert_close(logp.exp(), want)
        draws = J.draw_answers(logp, 40000, torch.Generator().manual_seed(0))
        freq = torch.stack([torch.bincount(d, minlength=4) for d in draws]).float() / draws.shape[1]
        assert (draws[0] != 3).all(), "a padded choice was drawn"
        assert (freq - want).abs().max() < 0.01, (freq, want)


def test_rendered_questions_have_exactly_the_prompts_answer_true(train_metas):
    qs, pixels = ToyQuestions(train_metas).rendered(60, random.Random(0))
    assert pixels.shape == (60, 96, 96, 3) and pixels.dtype == np.uint8
    assert {q.kind for q in qs} == set(J_KINDS := ("count", "color", "size", "shape", "position")), J_KINDS
    for q in qs:
        assert sum(q.truth) == 1 and len(q.choices) == len(set(q.choices)) >= 2, q
        codes = W.read_image(pixels[q.image])
        right = q.choices[q.truth.index(True)]
        assert W.evaluate(WP.parse_prompt(f"{q.question} {right}".strip()), codes)


def test_generated_questions_are_judged_on_the_image_not_the_prompt(train_metas):
    meta = WP.make_meta("counting", [{"class": "circle", "count": 3}])
    two = np.zeros(36, np.int64)
    two[[0, 5]] = W.code_of(0, 0, 0)  # two red circles drawn for "three circles"
    empty = np.zeros(36, np.int64)  # nothing drawn: no choice holds, not asked
    tq = ToyQuestions(train_metas, ["count"])
    qs = tq.generated([meta, meta], W.render(np.stack([two, empty])), 10, random.Random(0))
    assert len(qs) == 1 and qs[0].image == 0 and qs[0].question == "a photo of"
    assert qs[0].choices == ("two circles", "three circles", "four circles") and qs[0].truth == (True, False, False)


def test_choices_keep_the_rest_of_the_prompt_and_skip_other_entries_shapes():
    meta = WP.make_meta("two_object", [{"class": "circle", "count": 2}, {"class": "star", "count": 3}])
    got = [(k, q, [v["prompt"] for v in vs]) for k, q, vs in facts(meta)]
    assert [k for k, _, _ in got] == ["count", "shape", "count", "shape"]
    assert got[0][1] == "a photo of" and "a photo of three circles and three stars" in got[0][2]
    assert got[3][1] == "a photo of two circles and three"
    assert "a photo of two circles and three circles" not in got[3][2], "another entry's class is not a choice"
    assert len(got[3][2]) == len(W.SHAPES) - 1 and meta["prompt"] in got[3][2]


def _rollout(cfg, train_metas, backend, model, step=0):
    task = J.UnderstandingTask(cfg, train_metas, world=1)
    return task, task.rollout(backend, model, [], None, cfg, step, rank=0)


def test_rewards_are_exact_and_advantages_per_question_group(train_metas):
    backend, model = ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    cfg = load_config(None, ["--joint.enabled=true", "--joint.questions_per_step=12", "--joint.group_size=6"])
    _, ro = _rollout(cfg, train_metas, backend, model.eval())
    truth = J.truth_table(ro.questions, max(len(q.choices) for q in ro.questions))
    rewards = truth.gather(1, ro.chosen).float().reshape(-1)
    assert ro.metrics["und/reward/mean"] == pytest.approx(rewards.mean().item())
    torch.testing.assert_close(ro.advantages, kernels.group_advantages(rewards, 6, eps=1e-4))
    groups = ro.advantages.view(12, 6)
    assert groups.abs().sum() > 0 and torch.allclose(groups.sum(1), torch.zeros(12), atol=1e-5)


def test_rank_averaged_metrics_are_the_means_over_all_ranks_questions(train_metas):
    """Two ranks, one without questions (joint.source generated can leave one empty): the all-reduce mean of their
    metrics, summarised, equals one rank's metrics over the same questions, not NaN."""
    from gvu.train import all_reduce_mean

    backend, model = ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    cfg = load_config(None, ["--joint.enabled=true", "--joint.questions_per_step=8", "--joint.group_size=4"])
    task, ro = _rollout(cfg, train_metas, backend, model.eval())
    empty = task.metrics([], torch.zeros(0, 1), torch.zeros((0, 1), dtype=torch.bool), torch.zeros(0), 4)
    assert np.isnan(empty["und/accuracy"]) and empty["und/reward/group_std"] == 0.0
    two = [ro.metrics, empty]
    mean = {k: sum(m[k] for m in two) / 2 for k in ro.metrics}  # what all_reduce_mean gives over 2 ranks
    assert all_reduce_mean(dict(ro.metrics), 1) == ro.metrics
    got = J.summarise(mean, task.kinds, 4)
    for k in ("und/reward/mean", "und/reward/group_std", "und/accuracy", "und/p_true"):
        assert got[k] == pytest.approx(ro.metrics[k]), k
    alone = J.summarise(ro.metrics, task.kinds, 4)
    for k in task.kinds:
        a, b = got[f"und/{k}/accuracy"], alone[f"und/{k}/accuracy"]
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b), k


def test_understanding_loss_reaches_the_language_models_lora_and_splits_exactly(train_metas):
    from gvu import engine as E

    backend, base = ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    cfg = load_config(None, ["--lora.scope=all", "--joint.enabled=true", "--joint.questions_per_step=8",
                             "--joint.group_size=4", "--joint.beta=0.1"])  # fmt: skip
    model = E.build_policy(cfg, backend, base).eval()
    for n, p in model.named_parameters():  # LoRA B starts at 0: move it so that A's gradient is not 0 either
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    _, ro = _rollout(cfg, train_metas, backend, model)
    assert ro.ref_logp is not None and ro.advantages.abs().sum() > 0
    whole, _ = ro.loss(backend, model, 0, 1, 0, cfg)
    parts = [ro.loss(backend, model, i, 3, 0, cfg)[0] for i in range(3)]  # as 3 micro-batches average them
    torch.testing.assert_close(sum(parts) / 3, whole)
    whole.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values()), "a LoRA weight got no gradient"


def test_split_scope_trains_each_adapter_by_its_own_task_only(train_metas, tmp_path):
    """lora.scope=split: the understanding's passes run the second adapter (and the first is back after them), the
    understanding loss reaches only that adapter and the generation loss only the first, and both are saved."""
    from gvu import engine as E
    from gvu import train
    from gvu.checkpoint import save_adapter
    from gvu.models import UNDERSTANDING_ADAPTER, understanding_passes

    backend, base = ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    cfg = load_config(None, ["--lora.scope=split", "--joint.enabled=true", "--joint.questions_per_step=8",
                             "--joint.group_size=4", "--joint.beta=0.1"])  # fmt: skip
    model = E.build_policy(cfg, backend, base).eval()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    und = {n for n in lora if f".{UNDERSTANDING_ADAPTER}." in n}
    assert und and len(und) * 2 == len(lora) and all(p.requires_grad for p in lora.values())
    for n, p in lora.items():  # LoRA B starts at 0: move both adapters so that they differ from the base
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    task, ro = _rollout(cfg, train_metas, backend, model)
    q = ro.questions[:4]
    with torch.no_grad():
        plain = J.choice_scores(backend, model, ro.images[:4], q)
        with understanding_passes(model, "split"):
            inside = J.choice_scores(backend, model, ro.images[:4], q)
        assert not torch.allclose(plain, inside), "the understanding adapter did not run"
        torch.testing.assert_close(J.choice_scores(backend, model, ro.images[:4], q), plain)  # switched back
        with understanding_passes(model, "all"):
            torch.testing.assert_close(J.choice_scores(backend, model, ro.images[:4], q), plain)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n for n, p in lora.items() if p.grad is not None and p.grad.abs().sum() > 0}

    assert grads(ro.loss(backend, model, 0, 1, 0, cfg)[0]) == und
    prompts = backend.tokenize_prompts([train_metas[0]["prompt"]])
    tokens = backend.generate(model, prompts, 2, cfg.sampling, generator=torch.Generator().manual_seed(0))
    gen_loss = train.score_images(backend, model, prompts, tokens, cfg).sum()
    assert grads(gen_loss) == set(lora) - und
    save_adapter(model, tmp_path / "adapter", 1, True)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / UNDERSTANDING_ADAPTER / "adapter_model.safetensors").exists()


def test_caption_reward_is_zero_unless_true_then_the_share_of_the_scene_it_states():
    from gvu.toy.questions import caption_reward

    meta = WP.parse_prompt("a photo of a pink star below a black cross")
    scene = W.sample_scene(meta, random.Random(0))
    assert caption_reward("a photo of a pink star below a black cross", scene, meta) == 1.0
    assert caption_reward("a photo of a star below a black cross", scene, meta) == pytest.approx(3 / 4)
    assert caption_reward("a photo of a pink star and a black cross", scene, meta) == pytest.approx(3 / 4)
    assert caption_reward("a photo of a star and a cross", scene, meta) == pytest.approx(1 / 4)
    assert caption_reward("a photo of a star above a cross", scene, meta) == 0.0  # false
    assert caption_reward("a photo of a red star and a black cross", scene, meta) == 0.0  # false colour
    assert caption_reward("a photo of star star of", scene, meta) == 0.0  # unparseable
    two = WP.parse_prompt("a photo of two red circles")
    scene = W.sample_scene(two, random.Random(0))
    assert caption_reward("a photo of two red circles", scene, two) == 1.0
    assert caption_reward("a photo of two circles", scene, two) == pytest.approx(1 / 3)


def test_caption_task_rewards_the_captions_that_hold_and_its_loss_splits_exactly(train_metas):
    """joint.captions_per_step: G sampled captions per fresh scene, reward = caption_reward (0 unless it holds, as
    caption accuracy reads), group advantages, and a caption loss that micro-batches average to the whole and that
    reaches the LoRA; off, no caption pass runs and the question rollout is unchanged."""
    from gvu import engine as E
    from gvu.toy.questions import caption_holds

    backend, base = ToyUMM.new_model(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    over = ["--lora.scope=all", "--joint.enabled=true", "--joint.questions_per_step=4", "--joint.group_size=4",
            "--joint.beta=0.1"]  # fmt: skip
    cfg = load_config(None, [*over, "--joint.captions_per_step=3"])
    model = E.build_policy(cfg, backend, base).eval()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    _, ro = _rollout(cfg, train_metas, backend, model)
    cap = ro.captions
    kept = 12 * (1 - ro.metrics["und/caption/empty"])
    assert cap is not None and cap.ref_logp is not None and len(cap.advantages) == pytest.approx(kept)
    texts = cap.prompts.texts
    scenes = W.read_image(cap.images)
    assert all(t.split() for t in texts)
    holds = [caption_holds(t, c) for t, c in zip(texts, scenes, strict=True)]
    assert ro.metrics["und/caption/reward"] <= sum(holds) / 12 + 1e-6  # <= 1 per true caption, 0 otherwise
    if len(texts) == 12:  # no empty caption: the kept rows are whole groups, each of zero mean advantage
        assert torch.allclose(cap.advantages.view(3, 4).sum(1), torch.zeros(3), atol=1e-5)
    whole, m = cap.loss(backend, model, 0, 1, 0, cfg)
    parts = [cap.loss(backend, model, i, 3, 0, cfg)[0] for i in range(3)]
    torch.testing.assert_close(sum(parts) / 3, whole)
    assert "und/caption/kl" in m
    model.zero_grad(set_to_none=True)
    whole.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    both, _ = ro.loss(backend, model, 0, 1, 0, cfg)
    torch.testing.assert_close(both, ro.question_loss(backend, model, 0, 1, 0, cfg)[0] + whole)

    off = load_config(None, over)
    _, plain = _rollout(off, train_metas, backend, model)
    assert plain.captions is None and not any(k.startswith("und/caption") for k in plain.metrics)


def problems(overrides) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate.load_checked("configs/toy.yaml", overrides, world=2)
    return e.value.problems


def test_config_refuses_generation_scope_other_backends_and_bad_fields_at_once():
    got = "\n".join(problems(["--joint.enabled=true", "--joint.questions_per_step=5", "--joint.kinds=[count,pose]",
                              "--joint.group_size=1", "--joint.temperature=0"]))  # fmt: skip
    assert "lora.scope=generation runs every understanding pass with the adapter off" in got and "lora.scope=all" in got
    assert "joint.group_size must be >= 2" in got and "joint.temperature must be > 0" in got
    assert "joint.kinds=['count', 'pose']" in got
    got = "\n".join(problems(["--joint.enabled=true", "--lora.scope=all", "--model.backend=janus"]))
    assert "joint.enabled needs questions about images with exact answers" in got and "model.backend=toy" in got
    got = "\n".join(problems(["--joint.enabled=true", "--lora.scope=all", "--joint.questions_per_step=5"]))
    assert "joint.questions_per_step=5 must be divisible by the ranks (2)" in got
    validate.load_checked("configs/toy.yaml", ["--joint.enabled=true", "--lora.scope=all"], world=2)
    validate.load_checked("configs/toy.yaml", ["--joint.questions_per_step=5"], world=2)  # off: no joint checks
    got = "\n".join(problems(["--lora.scope=split"]))
    assert "lora.scope=split adds an understanding adapter that only joint RL trains" in got
    validate.load_checked("configs/toy.yaml", ["--joint.enabled=true", "--lora.scope=split"], world=2)


def _steps(ckpt, tmp_path, extra, steps=2):
    from gvu import engine as E
    from gvu import train
    from gvu.data import PromptSampler, load_prompt_sets
    from gvu.metrics import PhaseTimer

    cfg = load_config(None, small_run(ckpt, tmp_path, steps, "--optim.warmup_steps=0", "--lora.scope=all",
                                      "--grpo.prompts_per_step=2", "--grpo.group_size=2", *extra))  # fmt: skip
    torch.set_num_threads(1)  # the cores are shared: one thread is faster than two waiting on each other
    rank, world = E.init_distributed()
    torch.manual_seed(0)
    backend, model = E.build(cfg)
    engine = E.make_engine(model, cfg, world)
    train_metas = load_prompt_sets(cfg.data)[0]
    sampler = PromptSampler(train_metas, cfg.grpo.prompts_per_step, 0, rank, world)
    task = J.UnderstandingTask(cfg, train_metas, world) if cfg.joint.enabled else None
    return [train.train_step(engine, backend, sampler.batch(s), cfg, s, rank, PhaseTimer(), task)[0]
            for s in range(steps)]  # fmt: skip


def test_joint_steps_are_deterministic_and_off_ignores_the_joint_fields(ckpt, tmp_path):
    on = ["--joint.enabled=true", "--joint.source=both", "--joint.questions_per_step=4", "--joint.group_size=4"]
    a, b = _steps(ckpt, tmp_path / "a", on), _steps(ckpt, tmp_path / "b", on)
    assert a == b and "und/loss" in a[0] and a[0]["und/questions"] > 0
    off = _steps(ckpt, tmp_path / "c", [])
    inert = _steps(ckpt, tmp_path / "d", ["--joint.weight=5", "--joint.gen_weight=3", "--joint.source=generated"])
    assert off == inert and not any(k.startswith(("und/", "joint/")) for k in off[0])
    assert off[1]["loss"] != a[1]["loss"] or off[1]["reward/mean"] != a[1]["reward/mean"], "joint RL changed nothing"


@pytest.mark.parametrize("scope", ["all", "split"])
def test_trainer_logs_both_tasks(ckpt, tmp_path, scope):
    out = tmp_path / "run"
    args = small_run(ckpt, out, 2, f"--lora.scope={scope}", "--joint.enabled=true", "--joint.questions_per_step=6",
                     "--joint.group_size=4", "--train.threads=1")  # fmt: skip
    proc = run_trainer(args, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "und acc" in proc.stdout
    m = read_metrics(out)
    for key in ("loss", "reward/mean", "und/loss", "und/reward/mean", "und/accuracy", "joint/loss", "time/und_rollout"):
        assert key in m[2], key
    asked = sum(m[2][f"und/{k}/asked"] for k in ("count", "color", "size", "shape", "position"))
    assert asked == m[2]["und/questions"] == 6
    assert all(f"und/{k}/accuracy" in m[2] for k in ("count", "color", "size", "shape", "position"))
    if scope == "split":  # through DeepSpeed's optimizer both adapters moved off their zero B
        from safetensors.torch import load_file

        for folder in (out / "adapter", out / "adapter" / "understanding"):
            b = [v for k, v in load_file(folder / "adapter_model.safetensors").items() if "lora_B" in k]
            assert b and all(v.abs().sum() > 0 for v in b), folder


def test_resuming_a_run_saved_before_the_joint_section_sees_no_change(tmp_path):
    import yaml

    from gvu import run_folder
    from gvu.config import Config

    saved = Config().to_dict()
    del saved["joint"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert run_folder.check_resume_config(Config(), tmp_path) == []
    with pytest.raises(ConfigError, match="joint.enabled"):
        run_folder.check_resume_config(load_config(None, ["--joint.enabled=true"]), tmp_path)


def test_two_ranks_log_the_understanding_over_both_ranks_questions(ckpt, tmp_path):
    """A real two-rank run (DeepSpeed, gloo) with joint RL: it finishes and its logged understanding metrics are
    the means over both ranks' questions (finite; the counts summed), as `summarise` re-forms them."""
    args = small_run(ckpt, tmp_path / "run", 2, "--train.threads=1", "--lora.scope=all", "--joint.enabled=true",
                     "--joint.questions_per_step=4", "--joint.group_size=2", "--grpo.prompts_per_step=2",
                     "--grpo.group_size=2")  # fmt: skip
    proc = run_trainer(args, tmp_path, ranks=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert sorted(rows) == [1, 2]
    for r in rows.values():
        assert r["und/questions"] == 2.0  # the rank average of 2 questions each
        assert 0.0 <= r["und/accuracy"] <= 1.0 and 0.0 <= r["und/reward/mean"] <= 1.0
        asked = sum(r[f"und/{k}/asked"] for k in ("count", "color", "size", "shape", "position"))
        assert asked == pytest.approx(2.0)
