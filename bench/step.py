"""Whole-step time breakdown of a GvU step, in-process: the toy UMM (configs/toy.yaml: 16 prompts x 8 samples) or
a random Janus at Janus-Pro's layout (CFG 5, 576 codes of 16384; bf16 at Janus-Pro-1B's shapes for a GPU).

    python bench/step.py                    # 1 warmup, then 3 timed steps alternating with 2 baseline steps
    python bench/step.py --quick            # 2 prompts x 2 samples, 1 step each (the smoke test)
    python bench/step.py --model janus --shapes real            # small body on CPU: 2 prompts x 4 samples
    python bench/step.py --model janus --shapes 1b --device cuda  # Janus-Pro-1B's shapes: 4 x 8 (the GPU check)

Runs gvu.train.train_step on a one-rank DeepSpeed engine (ZeRO-2, LoRA) and reads gvu.metrics.PhaseTimer:
seconds per phase (rollout, decode, reward, ref_logprobs, policy_logprobs, backward, optimizer; "other" is the
untimed rest: tokenising, advantages, metrics and the shapes-world score) and their shares of the step.
Baseline, measured in the same run on the same engine: the step with rollout through HF `generate`
(bench/rollout.py) and the reward through the official per-token loop (bench/reward.py), everything else ours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repo first, so `import kernels` finds the package
import _common as C  # noqa: E402
import torch  # noqa: E402

PHASES = ("rollout", "decode", "reward", "ref_logprobs", "policy_logprobs", "backward", "optimizer", "other")


class HFRolloutAdapter:
    """The adapter with `generate` swapped for HF generate (the baseline step): the toy's with ImageLayoutProcessor,
    Janus' `generate(generation_mode="image", guidance_scale=5)`."""

    def __init__(self, adapter, janus: bool):
        self._a, self._janus = adapter, janus

    def __getattr__(self, name):
        return getattr(self._a, name)

    def generate(self, model, prompts, num_samples, sampling, generator=None):
        from rollout import hf_generate, janus_hf_generate

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        fn = janus_hf_generate if self._janus else hf_generate
        return fn(self._a, model, prompts, num_samples, greedy=False, seed=seed)


def timed_steps(train, engine, adapter, sampler, cfg, first: int, n: int) -> list[dict[str, float]]:
    """Seconds per phase of steps first..first+n-1 (plus "other" and "total")."""
    from gvu.metrics import PhaseTimer

    out = []
    for step in range(first, first + n):
        timer = PhaseTimer()
        t0 = time.perf_counter()
        train.train_step(engine, adapter, sampler.batch(step), cfg, step, 0, timer)
        total = time.perf_counter() - t0
        ph = timer.pop()
        ph["other"] = total - sum(ph.values())
        ph["total"] = total
        out.append(ph)
    return out


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 prompts x 2 samples, 1 step each of ours and baseline")
    p.add_argument("--steps", type=int, default=3, help="timed steps after warmup (median per phase)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--baseline-steps", type=int, default=2, help="steps of the HF-generate + official-reward baseline")
    # 1 by default: this model is too small for intra-op parallelism, and with a second busy job on the 2 cores a
    # 2-thread run waits at every barrier (16x8 rollout: 0.60 s at 1 thread vs 11.2 s at 2, load ~5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/step.csv)")
    p.add_argument("--model", choices=["toy", "janus"], default="toy", help="toy: the shipped toy UMM")
    p.add_argument("--shapes", choices=["tiny", "real", "1b"], default="real", help="janus: the tiny random Janus, "
                   "Janus-Pro's layout with a small body (real) or Janus-Pro-1B's shapes in bf16 (1b)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", default=None, help="BxG prompts x samples (default toy 16x8, janus real 2x4, 1b 4x8)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from reward import official_reward

    from gvu import engine as E
    from gvu import train
    from gvu.config import load_config
    from gvu.data import PromptSampler, load_prompt_sets
    from gvu.rewards import intrinsic
    from gvu.toy.backend import ToyUMM

    tmp = tempfile.TemporaryDirectory(prefix="gvu-bench-step-")
    janus = args.model == "janus"
    B, G = (int(x) for x in (args.batch or ("4x8" if args.shapes == "1b" else "2x4") if janus else "16x8").split("x"))
    # the baseline is the official reward, which scores the prompt's tokens only: ours does the same here
    over = [f"--train.output_dir={tmp.name}/run", "--train.eval_before=false", "--grpo.reward_eos=false"]
    over += [f"--grpo.prompts_per_step={B}", f"--grpo.group_size={G}"]
    if args.quick:
        over += ["--grpo.prompts_per_step=2", "--grpo.group_size=2"]
        args.steps, args.warmup, args.baseline_steps = 1, 0, 1
    if janus:  # LoRA r16 on the language model, CFG 5, as configs/janus_pro_1b.yaml; the model built in memory
        dtype = "bfloat16" if args.shapes == "1b" else "float32"
        over += ["--model.backend=janus", f"--model.dtype={dtype}", "--sampling.cfg_scale=5", "--lora.r=16",
                 "--lora.alpha=32", "--grpo.beta=0.01", "--lora.image_head=none"]  # fmt: skip
    else:
        ckpt = C.toy_checkpoint()
        src = "gvu/assets/toy_umm"
        if ckpt is None:  # a random model of the same shape costs the same
            ckpt, src = str(Path(tmp.name) / "toy"), "random(seed=0)"
            a, m = ToyUMM.new_model(seed=0)
            a.save_pretrained(ckpt, m)
        over.append(f"--model.path={ckpt}")
    cfg = load_config(C.REPO / "configs" / "toy.yaml", over)
    rank, world = E.init_distributed()
    torch.manual_seed(cfg.train.seed)
    if janus:
        adapter, model, src = C.load_janus(shapes=args.shapes, device=args.device)
        model = E.build_policy(cfg, adapter, model)
    else:
        adapter, model = E.build(cfg)
    engine = E.make_engine(model, cfg, world)
    sampler = PromptSampler(load_prompt_sets(cfg.data)[0], cfg.grpo.prompts_per_step, cfg.data.seed, rank, world)

    timed_steps(train, engine, adapter, sampler, cfg, 0, args.warmup)
    ours, base = [], []
    baseline_adapter = HFRolloutAdapter(adapter, janus)
    step = args.warmup
    for i in range(max(args.steps, args.baseline_steps)):  # ours and baseline alternate: load hits both alike
        if i < args.steps:
            ours += timed_steps(train, engine, adapter, sampler, cfg, step, 1)
            step += 1
        if i < args.baseline_steps:
            # same engine, next step's prompts: only the rollout and reward implementations differ
            fast_reward = intrinsic.intrinsic_reward  # what the gvu reward (grpo.rewards' default) calls
            intrinsic.intrinsic_reward = lambda *a, with_eos=False, **kw: official_reward(*a, **kw)  # eos off above
            try:
                base += timed_steps(train, engine, baseline_adapter, sampler, cfg, step, 1)
            finally:
                intrinsic.intrinsic_reward = fast_reward
            step += 1

    step_no = [step]
    peak = C.peak_memory(lambda: timed_steps(train, engine, adapter, sampler, cfg, step_no[0], 1), args.device)
    info = C.machine_info()
    B, G = cfg.grpo.prompts_per_step, cfg.grpo.group_size
    med = {k: statistics.median(s.get(k, 0.0) for s in ours) for k in (*PHASES, "total")}
    bmed = {k: statistics.median(s.get(k, 0.0) for s in base) for k in (*PHASES, "total")} if base else {}
    rows = []
    for k in (*PHASES, "total"):
        rows.append(
            {
                **info,
                "bench": "step",
                "model": src,
                "B": B,
                "G": G,
                "images": B * G,
                "zero_stage": 2,
                "device": args.device,
                "dtype": cfg.model.dtype,
                "step_peak_mib": peak,
                "lora_r": cfg.lora.r,
                "phase": k,
                "seconds": med[k],
                "share": med[k] / med["total"],
                "baseline": "hf_generate+official_reward" if base else "",
                "baseline_seconds": bmed.get(k, float("nan")),
                "baseline_over_ours": bmed[k] / med[k] if base and med[k] > 0 else float("nan"),
                "steps": args.steps,
                "baseline_steps": len(base),
                "quick": args.quick,
            }
        )
    print(
        f"step | {info['cpu']} | {info['threads']} threads | torch {info['torch']} | "
        f"transformers {info['transformers']} | {info['git_sha']} | model {src} | B={B} G={G} | "
        f"median of {args.steps} steps after {args.warmup} warmup | peak {peak:.0f} MiB beyond the weights | "
        f"{info['cuda']} | load {info['loadavg']}"
    )
    print(C.table(rows, ["phase", "seconds", "share", "baseline_seconds", "baseline_over_ours"]))
    path = C.append_csv("step", rows, args.out)
    print(f"appended {len(rows)} rows to {path}")
    tmp.cleanup()
    return rows


if __name__ == "__main__":
    run()
