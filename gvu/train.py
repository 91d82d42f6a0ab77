"""GvU trainer: GRPO with the model's own understanding as the reward, LoRA through peft, DeepSpeed ZeRO.

    deepspeed gvu/train.py                                   # the embedded toy UMM on CPU (configs/toy.yaml)
    deepspeed --num_gpus 2 gvu/train.py                      # two ranks (CPU ranks on a CPU machine)
    deepspeed gvu/train.py configs/toy.yaml --grpo.beta=0.01 --train.steps=100
    python gvu/train.py ...                                  # one process, no launcher

One step (shared/DESIGN.md): prompts -> rollout (G images each) -> decode -> intrinsic reward -> advantages ->
policy / reference log-probs of the image tokens -> GRPO loss -> backward -> optimizer step -> metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed gvu/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import kernels
from gvu.config import Config, ConfigError, load_config, resolve_path
from gvu.data import PromptSampler, load_prompt_sets
from gvu.grpo import grpo_loss
from gvu.metrics import MetricsWriter, PhaseTimer, atomic_dir, atomic_write_text, plot_curves, save_grid
from gvu.models import adapter_disabled, backbone_and_head, load_umm, save_policy_updates
from gvu.reward import intrinsic_reward

DEFAULT_CONFIG = "configs/toy.yaml"


# ----------------------------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description="GvU: GRPO post-training of a unified multimodal model with its own understanding as reward.",
        epilog="Any config field can be overridden as --section.field=value, e.g. --grpo.beta=0.01.",
    )
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r and "." in r.split("=")[0])]
    if bad:
        p.error(f"unrecognised arguments {bad}; overrides look like --section.field=value")
    return load_config(args.config, rest), args


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Works under the deepspeed launcher and as a plain single process (gloo on CPU)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python gvu/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON with every "auto" filled from our config (batch sizes, optimizer, precision)."""
    path = resolve_path(cfg.train.deepspeed)
    if not path.exists():
        raise ConfigError(f"train.deepspeed={cfg.train.deepspeed!r}: file not found (ship configs/ds_zero2.json)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    n_local = cfg.grpo.prompts_per_step * cfg.grpo.group_size // world
    micro = cfg.grpo.micro_batch_size or n_local
    if n_local % micro:
        raise ConfigError(f"grpo.micro_batch_size={micro} must divide the {n_local} sequences each rank trains on")
    auto = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": n_local // micro,
        "train_batch_size": n_local * world,
        "gradient_clipping": cfg.optim.max_grad_norm,
    }
    for k, v in auto.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    for key, want in (("bf16", "bfloat16"), ("fp16", "float16")):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = cfg.model.dtype == want
    opt = ds.get("optimizer", {}).get("params", {})
    for k, v in (("lr", cfg.optim.lr), ("betas", list(cfg.optim.betas)), ("weight_decay", cfg.optim.weight_decay)):
        if opt.get(k) == "auto":
            opt[k] = v
    return ds


def build_model(cfg: Config):
    """(adapter, peft model with a fresh LoRA adapter on the loaded UMM)."""
    from peft import LoraConfig, get_peft_model

    adapter, model = load_umm(cfg.model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if not cfg.lora.enabled:
        raise ConfigError("lora.enabled=false is not supported yet: the reference policy is the adapter-disabled model")
    lcfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        # an adapter may narrow the names to its language model (Janus: not SigLIP's q/k/v_proj, not the VQ)
        target_modules=(
            adapter.lora_targets(list(cfg.lora.target_modules))
            if hasattr(adapter, "lora_targets")
            else list(cfg.lora.target_modules)
        ),
        bias="none",
    )
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules={cfg.lora.target_modules}: {e}") from None
    _, head = backbone_and_head(model)
    if hasattr(head, "lora_A"):
        # log-probs apply head.weight directly (kernels.linear_token_logprobs), which a LoRA delta never reaches
        raise ConfigError(
            f"lora.target_modules={cfg.lora.target_modules} adapts the output head, whose weight the log-prob "
            "kernels read directly, so the adapter would be silently ignored; adapt the decoder's layers only "
            "(e.g. drop lm_head from lora.target_modules)"
        )
    if cfg.lora.image_head == "factorised":
        if not hasattr(adapter, "add_image_head_update"):
            raise ConfigError(
                f"lora.image_head=factorised needs image codes with known attributes (the toy UMM); "
                f"model.backend={cfg.model.backend!r} has none: set lora.image_head=none"
            )
        if deepspeed_config(cfg, 1).get("zero_optimization", {}).get("stage", 0) == 3:
            raise ConfigError(
                "lora.image_head=factorised trains the output head, which ZeRO-3 partitions: use "
                "train.deepspeed=configs/ds_zero2.json or lora.image_head=none"
            )
        adapter.add_image_head_update(model)
    return adapter, model


def make_engine(model, cfg: Config, world: int):
    """DeepSpeed engine over the peft model, optimising only the trainable (LoRA) parameters."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    # the scheduler is stepped by engine.step() at each optimizer step and saved in DeepSpeed's checkpoints
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    return engine


def lr_lambda(cfg: Config):
    """Multiplier of optim.lr at a step: linear warmup over optim.warmup_steps, then constant (the prototype's
    best runs used constant lr) or a cosine down to optim.min_lr_ratio at train.steps."""
    w, n, lo = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def at(step: int) -> float:
        if step < w:
            return (step + 1) / w
        if cfg.optim.schedule == "constant":
            return 1.0
        t = min(1.0, (step - w) / max(1, n - w))
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))

    return at


# ----------------------------------------------------------------------------------------------- one step


def train_step(engine, adapter, metas: list[dict], cfg: Config, step: int, rank: int, timer: PhaseTimer) -> dict:
    """One GvU step on this rank's prompts; returns its metrics (this rank's)."""
    G, g = cfg.grpo.group_size, cfg.grpo
    model = engine.module
    device = engine.device
    gen = torch.Generator(device="cpu").manual_seed(cfg.train.seed * 1_000_003 + step * 101 + rank)
    prompts = adapter.tokenize_prompts([m["prompt"] for m in metas], device=device)
    cfg_scale = cfg.sampling.cfg_scale if g.logprob_mode == "rollout" else 1.0
    T = cfg.sampling.temperature

    model.eval()  # no dropout while sampling and scoring
    with timer("rollout"):
        image_tokens = adapter.generate(model, prompts, G, cfg.sampling, generator=gen)  # (B*G, L_img)
    with timer("decode"):
        images = adapter.decode(image_tokens)  # (B*G, H, W, 3) uint8
    with timer("reward"):
        frozen = g.reward_teacher == "reference" or cfg.lora.scope == "generation"
        teacher = adapter_disabled(model) if frozen else nullcontext()
        with teacher:
            rewards = intrinsic_reward(adapter, model, images, prompts.repeat_interleave(G), with_eos=g.reward_eos)
    advantages = kernels.group_advantages(rewards, G, eps=g.adv_eps, scale=g.scale_rewards)
    with timer("ref_logprobs"), torch.no_grad():
        ref_logp = None
        if g.beta > 0:
            with adapter_disabled(model):
                ref_logp = adapter.image_logprobs(model, prompts, image_tokens, temperature=T, cfg_scale=cfg_scale)
    # Updates after the first are off-policy: their old log-probs are the first update's, taken before any
    # optimizer step (DeepSpeed steps once per update, at the last micro-batch), so no extra pass computes them.
    old_logp: torch.Tensor | None = None

    model.train()
    N = image_tokens.shape[0]
    micro = engine.train_micro_batch_size_per_gpu()
    mask = torch.ones_like(image_tokens, dtype=torch.bool)
    n_micro = N // micro
    acc: dict[str, float] = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio": 0.0}
    for update in range(g.updates_per_rollout):
        for i in range(n_micro):
            rows = slice(i * micro, (i + 1) * micro)
            p_rows = slice(i * micro // G, (i + 1) * micro // G)
            with timer("policy_logprobs"):
                logp = adapter.image_logprobs(
                    model, prompts[p_rows], image_tokens[rows], temperature=T, cfg_scale=cfg_scale
                )
                if update == 0 and g.updates_per_rollout > 1:
                    if old_logp is None:
                        old_logp = logp.new_empty((N, *logp.shape[1:]))
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
            with timer("backward"):
                engine.backward(loss)
            with timer("optimizer"):
                engine.step()  # DeepSpeed steps the optimizer at the gradient-accumulation boundary
            k = g.updates_per_rollout * n_micro
            acc["loss"] += loss.item() / k
            for key in ("kl", "clip_frac", "ratio"):
                acc[key] += m[key].item() / k

    valid = rewards[~torch.isnan(rewards)]
    out = {
        **acc,
        "reward/mean": valid.mean().item() if valid.numel() else float("nan"),
        "reward/std": valid.std().item() if valid.numel() > 1 else 0.0,
        "reward/group_std": torch.nan_to_num(rewards.view(-1, G).std(1)).mean().item(),
        "lr": engine.get_lr()[0],
    }
    if cfg.data.prompts == "shapes":  # the toy world's exact evaluator on the rollouts themselves: a free score curve
        from gvu import shapes_world

        codes = shapes_world.read_image(images)  # once for the batch (B*G, 36)
        rows = [m for m in metas for _ in range(G)]
        out["train/score"] = float(np.mean([shapes_world.evaluate(m, c) for m, c in zip(rows, codes, strict=True)]))
    return out


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse_args(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    rank, world = init_distributed()
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // world))
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)

    run_dir = Path(cfg.train.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume_tag = None
    if cfg.train.resume and (ckpt_dir / "latest").exists():
        resume_tag = (ckpt_dir / "latest").read_text().strip()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    t_start = time.time()

    adapter, model = build_model(cfg)
    train_metas, eval_metas = load_prompt_sets(cfg.data)
    sampler = PromptSampler(
        train_metas, cfg.grpo.prompts_per_step, cfg.data.seed, rank, world, balance_tags=cfg.data.balance_tags
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(
        f"GvU | model {cfg.model.backend}:{cfg.model.path} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"params, {sum(p.numel() for p in trainable) / 1e3:.1f}k trainable (LoRA r={cfg.lora.r}) | "
        f"{len(train_metas)} train / {len(eval_metas)} held-out prompts | ranks {world} | "
        f"kernels backend {kernels.choose(torch.device('cpu'))}"
    )
    engine = make_engine(model, cfg, world)

    start_step, state = 0, {}
    if resume_tag is not None:
        _, state = engine.load_checkpoint(str(ckpt_dir), tag=resume_tag)
        state = state or {}
        start_step = int(state.get("step", 0))
        say(f"resumed from {ckpt_dir / resume_tag} at step {start_step}")
    writer = MetricsWriter(run_dir, is_main, resume_step=start_step)

    # --- before: held-out generation, understanding, sample grid
    results = dict(state.get("results", {}))
    if cfg.train.eval_before and "before" not in results:
        say("evaluating the base model ...")
        results["before"] = evaluate_all(adapter, engine.module, eval_metas, cfg, rank, world)
        write_samples(adapter, engine.module, eval_metas, cfg, run_dir / "samples_before.png", is_main)
        say(format_summary("base", results["before"]))

    # --- train
    timer = PhaseTimer()
    phase_totals: dict[str, float] = {}
    profiler = make_profiler(run_dir) if cfg.train.profile else None
    steps_done = start_step
    t_train = time.time()
    for step in range(start_step, cfg.train.steps):
        t0 = time.time()
        metrics = train_step(engine, adapter, sampler.batch(step), cfg, step, rank, timer)
        phases = timer.pop()
        for k, v in phases.items():
            phase_totals[k] = phase_totals.get(k, 0.0) + v
        metrics.update({f"time/{k}": v for k, v in phases.items()})
        metrics["time/step"] = time.time() - t0
        metrics = all_reduce_mean(metrics, world)
        steps_done = step + 1
        writer.log(steps_done, metrics)
        if profiler is not None:
            profiler.step()
        if is_main and (steps_done % cfg.train.log_every == 0 or steps_done in (1, cfg.train.steps)):
            say(
                f"step {steps_done:4d}/{cfg.train.steps} | reward {metrics['reward/mean']:.4f} | "
                f"score {metrics.get('train/score', float('nan')):.3f} | loss {metrics['loss']:+.4f} | "
                f"kl {metrics['kl']:.4f} | "
                f"{metrics['time/step']:.2f}s/step (rollout {phases.get('rollout', 0):.2f}, "
                f"reward {phases.get('reward', 0):.2f}, backward {phases.get('backward', 0):.2f})",
                flush=True,
            )
        out_of_time = cfg.train.time_limit_minutes and (time.time() - t_train) / 60 > cfg.train.time_limit_minutes
        if steps_done % cfg.train.save_every == 0 or out_of_time:
            save_checkpoint(engine, run_dir, steps_done, results, is_main, cfg.train.keep_checkpoints)
        if out_of_time:
            say(f"train.time_limit_minutes={cfg.train.time_limit_minutes} reached at step {steps_done}")
            break
    if profiler is not None:
        profiler.stop()
    save_checkpoint(engine, run_dir, steps_done, results, is_main, cfg.train.keep_checkpoints)
    if steps_done > start_step:
        say(phase_table(phase_totals, steps_done - start_step))

    # --- after
    if cfg.train.eval_after:
        say("evaluating the trained model ...")
        results["after"] = evaluate_all(adapter, engine.module, eval_metas, cfg, rank, world)
        write_samples(adapter, engine.module, eval_metas, cfg, run_dir / "samples_after.png", is_main)
    if is_main:
        summary = {"steps": steps_done, "minutes": (time.time() - t_start) / 60, **results}
        atomic_write_text(run_dir / "results.json", json.dumps(summary, indent=2))
        if "after" in results:
            print(format_summary("trained", results["after"]))
        if "before" in results and "after" in results:
            from gvu import evaluate as gvu_eval

            print(gvu_eval.format_table(results["before"]["generation"], results["after"]["generation"]))
        b = results.get("before", {}).get("generation", {}).get("overall")
        a = results.get("after", {}).get("generation", {}).get("overall")
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", b, a)
        print(f"run folder: {run_dir} ({summary['minutes']:.1f} min)")
    writer.close()
    torch.distributed.barrier()
    return 0


# ----------------------------------------------------------------------------------------------- helpers


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


def evaluate_all(adapter, model, metas, cfg: Config, rank: int, world: int) -> dict:
    """Held-out generation scores and understanding checks. Ranks take interleaved shards (all ranks must run
    the model under ZeRO-3) and every rank gets the merged result. Seeds are fixed, so before/after are paired."""
    from gvu import evaluate as gvu_eval

    shard = metas[rank::world]
    gen = gvu_eval.generation_scores(
        adapter, model, shard, cfg.train.eval_samples, cfg.sampling, seed=cfg.train.seed * 7919 + rank
    )
    with adapter_disabled(model) if cfg.lora.scope == "generation" else nullcontext():
        und = gvu_eval.understanding_scores(adapter, model, shard, seed=cfg.train.seed * 7919 + rank)
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (gen, und))
        gen = merge_generation([p[0] for p in parts], metas, cfg.train.eval_samples)
        und = merge_understanding([p[1] for p in parts])
    return {"generation": gen, "understanding": und}


def merge_generation(parts: list[dict], metas: list[dict], samples: int) -> dict:
    """Per-rank generation_scores of shards metas[r::world] -> one dict in the original prompt order."""
    from gvu import evaluate as gvu_eval

    world = len(parts)
    per_prompt = [parts[i % world]["per_prompt"][i // world] for i in range(len(metas))]
    return gvu_eval.generation_summary(metas, per_prompt, samples)


def merge_understanding(parts: list[dict]) -> dict:
    """Weighted means of per-rank understanding_scores."""
    n = sum(p["n_scenes"] for p in parts)
    kinds = sorted({k for p in parts for k in p["ranking"]})
    ranking, ranking_n = {}, {}
    for k in kinds:
        ranking_n[k] = sum(p["ranking_n"].get(k, 0) for p in parts)
        ranking[k] = sum(p["ranking"].get(k, 0) * p["ranking_n"].get(k, 0) for p in parts) / max(ranking_n[k], 1)
    return {
        "caption_acc": sum(p["caption_acc"] * p["n_scenes"] for p in parts) / max(n, 1),
        "ranking": ranking,
        "ranking_n": ranking_n,
        "n_scenes": n,
        "examples": [e for p in parts for e in p["examples"]][:8],
    }


def format_summary(name: str, res: dict) -> str:
    g, u = res["generation"], res["understanding"]
    rank = ", ".join(f"{k} {v:.2f}" for k, v in u["ranking"].items())
    return (
        f"[{name}] generation overall {g['overall']:.3f} +- {g['stderr']:.3f} ({g['n']} images) | "
        f"understanding: caption acc {u['caption_acc']:.3f}, true-vs-perturbed ranking: {rank}"
    )


def write_samples(adapter, model, metas, cfg: Config, path: Path, is_main: bool) -> None:
    """A fixed grid: sample_grid_prompts held-out prompts x 4 samples, seeded, prompt under each image."""
    n = min(cfg.train.sample_grid_prompts, len(metas))
    if n == 0:
        return
    chosen = metas[:: max(1, len(metas) // n)][:n]
    prompts = adapter.tokenize_prompts([m["prompt"] for m in chosen], device=next(model.parameters()).device)
    gen = torch.Generator().manual_seed(cfg.train.seed + 7)
    with torch.no_grad():
        tokens = adapter.generate(model, prompts, 4, cfg.sampling, generator=gen)
    if is_main:
        images = adapter.decode(tokens)
        save_grid(path, images, [m["prompt"] for m in chosen for _ in range(4)], cols=8)


def save_checkpoint(engine, run_dir: Path, step: int, results: dict, is_main: bool, keep: int) -> None:
    """DeepSpeed checkpoint (resumable: optimizer, scheduler, step) + the LoRA adapter in peft's format."""
    tag = f"step{step}"
    ckpt_dir = run_dir / "checkpoints"
    if (ckpt_dir / tag).exists():
        return
    # DeepSpeed writes `latest` only after the tag's files, so a kill mid-save resumes from the previous tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "results": results})
    if is_main:
        import shutil

        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    from gvu.models import gathered

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    with gathered(*trainable):  # ZeRO-3 partitions even the LoRA weights: every rank must take part
        if is_main:
            with atomic_dir(run_dir / "adapter") as tmp:
                engine.module.save_pretrained(str(tmp), safe_serialization=True)
                save_policy_updates(engine.module, tmp)
                atomic_write_text(tmp / "step.txt", f"{step}\n")


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
