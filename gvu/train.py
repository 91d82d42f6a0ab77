"""GvU trainer: GRPO with the model's own understanding as the reward, LoRA through peft, DeepSpeed ZeRO.

    deepspeed gvu/train.py                                   # the embedded toy UMM on CPU (configs/toy.yaml)
    deepspeed --num_gpus 2 gvu/train.py                      # two ranks (CPU ranks on a CPU machine)
    deepspeed gvu/train.py configs/toy.yaml --grpo.beta=0.01 --train.steps=100
    python gvu/train.py --help                               # every config section and field
    python gvu/train.py ...                                  # one process, no launcher

One step (docs/DESIGN.md, "One step"): prompts -> rollout (G images each) -> decode -> rewards (grpo.rewards, by
name) -> advantages -> reference log-probs -> policy update (GRPO loss, backward, optimizer step) -> metrics.
With joint.enabled, the understanding task (gvu/joint.py) draws its answers before the update and its loss joins
each micro-batch's backward.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed gvu/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import kernels
from gvu import checkpoint, run_folder, validate
from gvu import engine as E
from gvu import joint as J
from gvu import preemption as P
from gvu import rewards as R
from gvu.config import Config, ConfigError, field_help
from gvu.data import PromptSampler, load_prompt_sets
from gvu.evaluate import evaluator_for, format_table, write_samples
from gvu.grpo import grpo_loss
from gvu.metrics import MetricsWriter, PhaseTimer, atomic_write_text, plot_curves, progress
from gvu.models import adapter_disabled, understanding_passes

DEFAULT_CONFIG = "configs/toy.yaml"


def parse_args(argv: list[str] | None) -> Config:
    """Experiment YAML + --section.field=value overrides -> the checked Config (gvu.validate.load_checked); --help
    lists every field."""
    p = argparse.ArgumentParser(
        description="GvU: GRPO post-training of a unified multimodal model with its own understanding as reward.",
        epilog="Every field below can be set in the YAML (section: {field: value}) or as --section.field=value.",
        usage="%(prog)s [config.yaml] [--section.field=value ...]",
        allow_abbrev=False,
    )
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    for section, rows in field_help():
        group = p.add_argument_group(section)
        for name, typ, default, help_ in rows:
            group.add_argument(
                f"--{section}.{name}",
                metavar=typ.upper(),
                default=argparse.SUPPRESS,
                help=f"{help_} (default {default!r})",
            )
    args, rest = p.parse_known_args(argv)
    overrides = [f"{k}={v}" for k, v in vars(args).items() if "." in k]
    for r in rest:  # unknown --section.field=value: load_config names it (and the nearest known field)
        if not (r.startswith("--") and "=" in r and "." in r.split("=")[0]):
            raise ConfigError(f"unrecognised argument {r!r}; overrides look like --section.field=value")
        overrides.append(r)
    return validate.load_checked(args.config, overrides, world=int(os.environ.get("WORLD_SIZE", "1")))


# ----------------------------------------------------------------------------------------------- one step


def train_step(engine, backend, metas: list[dict], cfg: Config, step: int, rank: int, timer: PhaseTimer, task=None):
    """One GvU step on this rank's prompts -> (this rank's metrics, the rollout's images (B*G, H, W, 3)); `task`: the
    understanding task of joint RL (gvu.joint.UnderstandingTask), None without."""
    model, g, G = engine.module, cfg.grpo, cfg.grpo.group_size
    prompts = backend.tokenize_prompts([m["prompt"] for m in metas], device=engine.device)
    seed = cfg.train.seed * 1_000_003 + step * 101 + rank

    model.eval()  # no dropout while sampling and scoring
    with timer("rollout"):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        image_tokens = backend.generate(model, prompts, G, cfg.sampling, generator=gen)  # (B*G, L_img)
    with timer("decode"):
        images = backend.decode(image_tokens)  # (B*G, H, W, 3) uint8
    with timer("reward"), reward_teacher(model, cfg):  # {name: (B*G,)}, each row scored against its own prompt
        row_metas = [m for m in metas for _ in range(G)]
        scores = R.score(backend, model, images, image_tokens, prompts.repeat_interleave(G), row_metas, cfg)
    advantages = R.advantages(scores, g)  # grpo.reward_mix
    with timer("ref_logprobs"), torch.no_grad():
        ref_logp = None
        if g.beta > 0:
            with adapter_disabled(model):
                ref_logp = score_images(backend, model, prompts, image_tokens, cfg)
    with timer("und_rollout") if task else nullcontext():  # joint RL: questions, answers drawn, rewards, advantages
        und = task.rollout(backend, model, metas, images, cfg, step, rank) if task else None
    model.train()
    losses = update_policy(engine, backend, prompts, image_tokens, advantages, ref_logp, cfg, timer, und)
    return {**losses, **R.metrics(scores, g), **(und.metrics if und else {}), "lr": engine.get_lr()[0]}, images


def reward_teacher(model, cfg: Config):
    """Who scores the images: the frozen base (reference teacher) or the policy's understanding (lora.scope: the
    one adapter, the base under generation, the understanding adapter under split)."""
    if cfg.grpo.reward_teacher == "reference":
        return adapter_disabled(model)
    return understanding_passes(model, cfg.lora.scope)


def score_images(backend, model, prompts, image_tokens, cfg: Config) -> torch.Tensor:
    """Log-probs (B*G, L_img) of the sampled tokens under grpo.logprob_mode's distribution."""
    cfg_scale = cfg.sampling.cfg_scale if cfg.grpo.logprob_mode == "rollout" else 1.0
    return backend.image_logprobs(
        model, prompts, image_tokens, temperature=cfg.sampling.temperature, cfg_scale=cfg_scale
    )


def update_policy(engine, backend, prompts, image_tokens, advantages, ref_logp, cfg: Config, timer, und=None) -> dict:
    """grpo.updates_per_rollout passes of micro-batches (whole groups) through loss, backward and the engine's
    step (DeepSpeed steps the optimizer at the last micro-batch of each pass) -> mean loss, kl, clip_frac, ratio.
    `und` (joint RL, gvu.joint.Rollout): micro-batch i also carries its share of the questions, and backpropagates
    joint.gen_weight * loss + joint.weight * und loss in one backward (+ und/loss, und/kl, und/clip_frac,
    joint/loss)."""
    g, G = cfg.grpo, cfg.grpo.group_size
    N, micro = image_tokens.shape[0], engine.train_micro_batch_size_per_gpu()
    n_micro = N // micro
    mask = torch.ones_like(image_tokens, dtype=torch.bool)
    # Updates after the first are off-policy: their old log-probs are the first update's, taken before any
    # optimizer step, so no extra pass computes them.
    old_logp: torch.Tensor | None = None
    acc = dict.fromkeys(("loss", "kl", "clip_frac", "ratio"), 0.0)
    if und is not None:
        acc.update(dict.fromkeys(("und/loss", "und/kl", "und/clip_frac", "joint/loss"), 0.0))
    k = g.updates_per_rollout * n_micro
    for update in range(g.updates_per_rollout):
        for i in range(n_micro):
            rows, p_rows = slice(i * micro, (i + 1) * micro), slice(i * micro // G, (i + 1) * micro // G)
            with timer("policy_logprobs"):
                logp = score_images(backend, engine.module, prompts[p_rows], image_tokens[rows], cfg)
                if update == 0 and g.updates_per_rollout > 1:
                    old_logp = logp.new_empty((N, *logp.shape[1:])) if old_logp is None else old_logp
                    old_logp[rows] = logp.detach()
                loss, m = grpo_loss(
                    logp,
                    logp.detach() if update == 0 else old_logp[rows],
                    advantages[rows],
                    mask[rows],
                    ref_logp=None if ref_logp is None else ref_logp[rows],
                    beta=g.beta,
                    eps_low=g.eps_low,
                    eps_high=g.eps_high,
                    loss_type=g.loss_type,
                    # dapo normalises by the tokens of the whole batch; DeepSpeed averages micro-batches and ranks
                    num_tokens=float(mask.sum()) / n_micro,
                )
            total = loss
            if und is not None:
                with timer("und_logprobs"):
                    u = und.loss(backend, engine.module, i, n_micro, update, cfg)
                if u is not None:
                    total = cfg.joint.gen_weight * loss + cfg.joint.weight * u[0]
                    acc["und/loss"] += u[0].item() / k
                    for key, v in u[1].items():  # und/kl, und/clip_frac (questions), und/caption/kl (captions)
                        acc[key] = acc.get(key, 0.0) + v / k
                acc["joint/loss"] += total.detach().item() / k
            with timer("backward"):
                engine.backward(total)
            with timer("optimizer"):
                engine.step()
            acc["loss"] += loss.item() / k
            for key in ("kl", "clip_frac", "ratio"):
                acc[key] += m[key].item() / k
    return acc


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 config error (nothing started); 3 checkpoints exist and none loads; 4 the output folder
    is another trainer's; 5 a checkpoint could not be written (the previous one is intact); 75 stopped by a signal
    after writing a checkpoint (rerun to resume)."""
    is_main = os.environ.get("RANK", "0") == "0"
    lock = None
    try:
        cfg = parse_args(argv)  # every check, before anything starts
        run_dir = Path(cfg.train.output_dir)
        if is_main:
            lock = run_folder.RunLock(run_dir)  # one writer per run folder
        resuming = cfg.train.resume and bool(checkpoint.tags_newest_first(run_dir / "checkpoints")[0])
        changes = run_folder.check_resume_config(cfg, run_dir) if resuming else []
        return run(cfg, changes, is_main)
    except ConfigError as e:
        if is_main:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    except run_folder.FolderLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return P.EXIT_FOLDER_LOCKED
    except checkpoint.ResumeError as e:
        print(f"resume error: {e}", file=sys.stderr)
        return P.EXIT_CANNOT_RESUME
    except checkpoint.SaveError as e:
        print(f"save error: {e}", file=sys.stderr)
        return P.EXIT_SAVE_FAILED
    finally:
        if lock is not None:
            lock.release()


def run(cfg: Config, changes: list, is_main: bool) -> int:
    """Set up, evaluate the base, train, evaluate the policy; returns the exit code."""
    say = print if is_main else (lambda *a, **k: None)
    E.announce_op_build(say)
    rank, world = E.init_distributed()
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // world))
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    run_dir, t_start = Path(cfg.train.output_dir), time.time()

    backend, model = E.build(cfg)
    train_metas, eval_metas = load_prompt_sets(cfg.data)
    sampler = PromptSampler(
        train_metas, cfg.grpo.prompts_per_step, cfg.data.seed, rank, world, balance_tags=cfg.data.balance_tags
    )
    evaluator = evaluator_for(cfg)
    task = J.UnderstandingTask(cfg, train_metas, world) if cfg.joint.enabled else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(
        f"GvU | model {cfg.model.backend}:{cfg.model.path} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"params, {sum(p.numel() for p in trainable) / 1e3:.1f}k trainable (LoRA r={cfg.lora.r}) | "
        f"{len(train_metas)} train / {len(eval_metas)} held-out prompts | evaluator "
        f"{evaluator.name if evaluator else 'none'} | ranks {world} | kernels {kernels.choose(torch.device('cpu'))}"
    )
    engine = E.make_engine(model, cfg, world)
    state = (checkpoint.resume(engine, run_dir, world, say) if cfg.train.resume else None) or {}
    start_step = int(state.get("step", 0))
    if start_step:
        say(f"resumed from {run_dir / 'checkpoints' / f'step{start_step}'} at step {start_step}")
        for f, a, b in changes:
            say(f"config change on resume: {f}: {a!r} -> {b!r}")
    if is_main:
        written = run_folder.record_config(cfg, run_dir, changes if start_step else [], start_step)
        if written and start_step:
            say(f"the changed config is kept in {written}; {run_dir / 'config.yaml'} stays the original")
    stop = P.StopFlag()
    writer = MetricsWriter(run_dir, is_main, resume_step=start_step)
    results = dict(state.get("results", {}))

    saved = [start_step or None]  # the step this process last saved (or resumed from), the same on every rank

    def save(step: int) -> None:
        # decided from process state, not from the files: rank 0 writes checkpoints/latest after the save's barrier,
        # so a rank reading it for the run's final save could see it missing, save alone and hang the others
        if saved[0] == step:
            return
        checkpoint.save_checkpoint(engine, run_dir, step, {"results": results}, is_main, cfg.train.keep_checkpoints)
        saved[0] = step

    def evaluate(label: str, key: str, grid: str) -> None:
        say(f"evaluating the {label} on {len(eval_metas)} held-out prompts x {cfg.train.eval_samples} samples ...")
        results[key] = evaluator.evaluate(backend, engine.module, eval_metas, cfg, rank, world)
        write_samples(backend, engine.module, eval_metas, cfg, run_dir / grid, is_main)
        say(evaluator.summary(label, results[key]))

    if evaluator is None and (cfg.train.eval_before or cfg.train.eval_after):
        say("no held-out evaluation: data.eval_file is empty (export samples with `python -m gvu.geneval`)")
    if evaluator and cfg.train.eval_before and "before" not in results:
        evaluate("base model", "before", "samples_before.png")

    timer, phase_totals = PhaseTimer(), {}
    profiler = make_profiler(run_dir) if cfg.train.profile else None
    steps_done, t_train = start_step, time.time()
    for step in progress(range(start_step, cfg.train.steps), "train", enabled=is_main):
        t0, timer.step = time.time(), step + 1
        metas = sampler.batch(step)
        metrics, images = train_step(engine, backend, metas, cfg, step, rank, timer, task)
        if evaluator:
            metrics.update(evaluator.rollout_metrics(metas, images, cfg.grpo.group_size))
        phases = timer.pop()
        for k, v in phases.items():
            phase_totals[k] = phase_totals.get(k, 0.0) + v
        metrics.update({f"time/{k}": v for k, v in phases.items()})
        metrics["time/step"] = time.time() - t0
        metrics = all_reduce_mean(metrics, world)
        if task:  # the understanding means over every rank's questions, from the rank-averaged sums and counts
            metrics = J.summarise(metrics, task.kinds, cfg.joint.group_size)
        steps_done = step + 1
        writer.log(steps_done, metrics)
        if profiler is not None:
            profiler.step()
        if is_main and (steps_done % cfg.train.log_every == 0 or steps_done in (1, cfg.train.steps)):
            print(step_line(steps_done, cfg.train.steps, metrics, phases), flush=True)
        out_of_time = cfg.train.time_limit_minutes and (time.time() - t_train) / 60 > cfg.train.time_limit_minutes
        preempted = stop.agreed(world)
        if steps_done % cfg.train.save_every == 0 or out_of_time or preempted:
            save(steps_done)
        if preempted:
            say(f"stopped by a signal at step {steps_done}; checkpoint written; rerun the same command to resume")
            writer.close()
            return P.EXIT_PREEMPTED
        if out_of_time:
            say(f"train.time_limit_minutes={cfg.train.time_limit_minutes} reached at step {steps_done}")
            break
    if profiler is not None:
        profiler.stop()
    save(steps_done)
    if steps_done > start_step:
        say(phase_table(phase_totals, steps_done - start_step))

    if evaluator and cfg.train.eval_after:
        evaluate("trained policy", "after", "samples_after.png")
    if is_main:
        summary = {"steps": steps_done, "minutes": (time.time() - t_start) / 60, **results}
        atomic_write_text(run_dir / "results.json", json.dumps(summary, indent=2))
        b, a = (results.get(k, {}).get("generation") for k in ("before", "after"))
        if b and a:
            print(format_table(b, a))
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", b and b["overall"], a and a["overall"])
        print(f"run folder: {run_dir} ({summary['minutes']:.1f} min)")
    writer.close()
    torch.distributed.barrier()
    return 0


# ----------------------------------------------------------------------------------------------- helpers


def step_line(step: int, steps: int, m: dict, phases: dict) -> str:
    top = ", ".join(f"{k} {phases.get(k, 0):.2f}" for k in ("rollout", "reward", "backward"))
    und = f"und acc {m['und/accuracy']:.3f} reward {m['und/reward/mean']:.3f} | " if "und/accuracy" in m else ""
    return (
        f"step {step:4d}/{steps} | reward {m['reward/mean']:.4f} | score {m.get('train/score', float('nan')):.3f} | "
        f"loss {m['loss']:+.4f} | kl {m['kl']:.4f} | {und}{m['time/step']:.2f}s/step ({top})"
    )


def all_reduce_mean(metrics: dict, world: int) -> dict:
    if world == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, float))
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {**metrics, **{k: v / world for k, v in zip(keys, t.tolist(), strict=True)}}


def phase_table(totals: dict[str, float], steps: int) -> str:
    """Mean seconds per step and share of each phase of the training step."""
    total = sum(totals.values())
    lines = [f"{'phase':<16}{'s/step':>9}{'share':>8}"]
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:<16}{v / steps:>9.3f}{v / max(total, 1e-9):>8.1%}")
    lines.append(f"{'total':<16}{total / steps:>9.3f}")
    return "\n".join(lines)


def make_profiler(run_dir: Path):
    """torch.profiler over steps 2-4 (after warm-up), trace viewable in TensorBoard or Perfetto."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(
        activities=acts,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(run_dir / "profile")),
        record_shapes=True,
    )
    prof.start()
    return prof


if __name__ == "__main__":
    sys.exit(main())
