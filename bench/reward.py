"""Reward throughput: gvu.rewards.intrinsic_reward vs an eager full-logits pass vs the official GvU loop.

    python bench/reward.py                  # every model (--model toy|janus|xomni|all): 8, 64, 256 images; the
                                            # official loop on 8 of them; 5 repeats
    python bench/reward.py --quick          # 4 images per model, 1 repeat (the smoke test)
    python bench/reward.py --shapes real    # Janus-Pro's layout, small body (576 understanding tokens at 384 px)

R(I, T) = exp(mean_j log p(T_j | [bos][boi] image [eoi][describe], T_<j)) for every (image, prompt) pair.
- ours: `intrinsic_reward`, one batched teacher-forced pass, lm_head only at prompt positions
  (kernels.linear_token_logprobs).
- eager_full: the same batched pass through `model(...).logits` (all positions x full vocabulary), then
  log_softmax + gather + masked mean.
- body_forward: the floor of any exact reward: the same rows through the model to its last hidden states (image
  encoder + decoder, no head); `vs_body_forward` is each one's time over it, `extra_mib_vs_body` its peak memory
  beyond it (bench/_common.peak_memory: CUDA allocator peaks, on CPU sampled RSS).
- official: ANCHORS.md's `gvu_score`, one image at a time, one full forward of the whole prefix per prompt token
  (no KV cache), softmax over the full vocabulary, product of p(T_j), 1/L power.
The baselines run any backend's rows as a plain forward takes them (backend.understanding_inputs). For the tiny
random Janus (_common.load_janus) that is [bos] "<|User|>: " [boi] [image_placeholder] x 16 [eoi]
"\nDescribe the image in detail.\n\n<|Assistant|>:" prompt with pixel_values, so each official per-token forward
also reruns SigLIP + aligner on the image, as a full forward of the whole prefix does.
For the tiny X-Omni (_common.load_xomni) the rows are the text-mode ChatML understanding turn reading the codes
(the token reward path).
All three start from uint8 pixels and must agree to fp32 tolerance (asserted). Implementations run interleaved in
one process; ratios are baseline seconds per image / our seconds per image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repo first, so `import kernels` finds the package
import _common as C  # noqa: E402
import torch  # noqa: E402

from gvu.models.wrapping import unwrap  # noqa: E402
from gvu.rewards import intrinsic_reward  # noqa: E402
from gvu.toy import prompts as WP  # noqa: E402


@torch.no_grad()
def eager_full_reward(backend, model, images, prompts) -> torch.Tensor:
    """One batched HF forward of backend.understanding_inputs (logits at every position over the full vocabulary),
    then log_softmax + gather + masked mean -> (N,) fp32."""
    u = backend.understanding_inputs(images, prompts)
    P = u.input_ids.shape[1] - u.targets.shape[1]
    logits = model(input_ids=u.input_ids, **u.forward_kwargs).logits  # (N, P+L, V); right padding: causal
    logp = torch.log_softmax(logits.float(), -1)[:, P - 1 : -1].gather(-1, u.targets.unsqueeze(-1)).squeeze(-1)
    m = u.mask.float()
    return ((logp * m).sum(-1) / m.sum(-1)).exp()


@torch.no_grad()
def body_forward(backend, model, images, prompts) -> torch.Tensor:
    """The floor of any exact reward: the same rows through the model up to its last hidden states (image encoder
    and decoder, no head), as one batched forward -> hidden (N, P+L, D)."""
    u = backend.understanding_inputs(images, prompts)
    return unwrap(model).model(input_ids=u.input_ids, **u.forward_kwargs).last_hidden_state


@torch.no_grad()
def official_reward(backend, model, images, prompts) -> torch.Tensor:
    """The official GvU loop: per image, per prompt token, a full forward of the whole prefix (no cache, with the
    image inputs again each time), softmax over the full vocabulary, product, 1/L power -> (N,)."""
    u = backend.understanding_inputs(images, prompts)
    P = u.input_ids.shape[1] - u.targets.shape[1]
    out = []
    for i in range(u.input_ids.shape[0]):
        L = int(u.mask[i].sum())
        extra = {k: v[i : i + 1] for k, v in u.forward_kwargs.items()}
        prob = torch.ones((), dtype=torch.float64)  # the official product is of Python floats: fp32 underflows
        for j in range(L):
            logits = model(input_ids=u.input_ids[i : i + 1, : P + j], **extra).logits  # the whole prefix again
            prob = prob * torch.softmax(logits[0, -1].float(), -1)[u.targets[i, j]]
        out.append(prob ** (1.0 / L))
    return torch.stack(out).float()


MODELS = {"toy": C.load_toy, "janus": C.load_janus, "xomni": C.load_xomni}


def make_batch(adapter, n: int, seed: int = 0, device="cpu"):
    """n random images (uint8 pixels) and n prompts from the shapes world's train set (cycled), on `device`."""
    texts = [m["prompt"] for m in WP.make_prompt_sets(0)[0]]
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, adapter.num_codes, (n, adapter.image_len), generator=g)
    images = adapter.decode(codes.to(device))  # the VQ decoder runs where the codes are
    return images, adapter.tokenize_prompts([texts[i % len(texts)] for i in range(n)], device=device)


def bench_model(name: str, args, info: dict) -> list[dict]:
    """Equality of the three rewards, then interleaved timings, at every batch size for one model -> CSV rows."""
    eager_fn, official_fn = eager_full_reward, official_reward
    if args.shapes == "tiny":
        adapter, model, src = MODELS[name]()
    else:
        adapter, model, src = C.load_janus(shapes=args.shapes, device=args.device)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        images, prompts = make_batch(adapter, n, device=args.device)
        k = min(n, args.official_images)
        sub_images, sub_prompts = images[:k], prompts[:k]
        r_ours = intrinsic_reward(adapter, model, images, prompts)
        r_eager = eager_fn(adapter, model, images, prompts)
        r_off = official_fn(adapter, model, sub_images, sub_prompts)
        # fp32: to rounding; bf16 (1b): the baselines' bf16 logits move a mean log-prob by ~0.05 (kernels: fp32)
        tol = dict(rtol=1e-4, atol=1e-7) if model.dtype == torch.float32 else dict(rtol=0.1, atol=0.0)
        torch.testing.assert_close(r_eager, r_ours, **tol, msg=f"{name}: eager_full != ours")
        torch.testing.assert_close(r_off, r_ours[:k], **tol, msg=f"{name}: official != ours")
        max_rel = max(
            ((r_eager - r_ours).abs() / r_ours.abs()).max().item(),
            ((r_off - r_ours[:k]).abs() / r_ours[:k].abs()).max().item(),
        )
        t = C.time_interleaved(
            {
                "ours": lambda: intrinsic_reward(adapter, model, images, prompts),  # noqa: B023
                "eager_full": lambda: eager_fn(adapter, model, images, prompts),  # noqa: B023
                "official": lambda: official_fn(adapter, model, sub_images, sub_prompts),  # noqa: B023
                "body_forward": lambda: body_forward(adapter, model, images, prompts),  # noqa: B023
            },
            warmup=args.warmup,
            repeats=args.repeats,
        )
        per_img = {k_: t[k_] / n for k_ in ("ours", "eager_full", "body_forward")} | {"official": t["official"] / k}
        mem = {  # peak MiB each allocates beyond what is live (the model's weights)
            "ours": C.peak_memory(lambda: intrinsic_reward(adapter, model, images, prompts), args.device),  # noqa: B023
            "eager_full": C.peak_memory(lambda: eager_fn(adapter, model, images, prompts), args.device),  # noqa: B023
            "body_forward": C.peak_memory(lambda: body_forward(adapter, model, images, prompts), args.device),  # noqa: B023
        }
        load = C.load_average()
        for impl in ("official", "eager_full", "body_forward", "ours"):
            rows.append(
                {
                    **info,
                    "loadavg": load,
                    "bench": "reward",
                    "model": src,
                    "images": n,
                    "timed_images": k if impl == "official" else n,
                    "impl": impl,
                    "seconds": t[impl],
                    "ms_per_image": 1e3 * per_img[impl],
                    "images_per_s": 1.0 / per_img[impl],
                    "ours_speedup_vs_this": per_img[impl] / per_img["ours"],
                    "vs_body_forward": per_img[impl] / per_img["body_forward"],
                    "peak_mib": mem.get(impl, float("nan")),
                    "extra_mib_vs_body": mem.get(impl, float("nan")) - mem["body_forward"],
                    "max_rel_diff_vs_ours": max_rel,
                    "repeats": args.repeats,
                    "quick": args.quick,
                    "shapes": args.shapes,
                }
            )
    shapes = C.janus_shapes(adapter, model) if name == "janus" else f"{adapter.image_len} codes/image"
    print(
        f"reward {name} | {info['cpu']} | {info['threads']} threads | torch {info['torch']} | "
        f"transformers {info['transformers']} | {info['git_sha']} | model {src} | "
        f"{shapes} | load {C.load_average()}"
    )
    cols = ["images", "impl", "timed_images", "seconds", "ms_per_image", "ours_speedup_vs_this", "vs_body_forward",
            "peak_mib", "extra_mib_vs_body"]  # fmt: skip
    print(C.table(rows, cols + ["loadavg"]))
    return rows


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 images, official on 2, 1 repeat: the smoke test")
    p.add_argument("--model", choices=[*MODELS, "all"], default="all", help="which UMM(s) to measure")
    p.add_argument("--sizes", default=None, help="comma list of images per batch (default 8,64,256; real: 8,16)")
    p.add_argument(
        "--shapes", choices=["tiny", "real", "1b"], default="tiny",
        help="real: Janus only, Janus-Pro's layout, small body; 1b: Janus-Pro-1B's shapes (bf16; for a GPU)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda (--shapes real / 1b)")
    p.add_argument("--official-images", type=int, default=8, help="images the official loop scores (per-image rate)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per implementation before timing")
    # 1 by default: this model is too small for intra-op parallelism, and with a second busy job on the 2 cores a
    # 2-thread run waits at every barrier (16x8 rollout: 0.60 s at 1 thread vs 11.2 s at 2, load ~5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/reward.csv)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.official_images, args.repeats, args.warmup = "4", 2, 1, 0

    # real / 1b: 16 images of 616 tokens x V=102400 are 4 GB of fp32 logits for the eager baseline (and its copy)
    args.sizes = args.sizes or ("8,16" if args.shapes != "tiny" else "8,64,256")
    info = C.machine_info()
    rows = []
    for name in ("janus",) if args.shapes != "tiny" else tuple(MODELS) if args.model == "all" else (args.model,):
        rows += bench_model(name, args, info)
    path = C.append_csv("reward", rows, args.out)
    worst = max(r["max_rel_diff_vs_ours"] for r in rows)
    print(f"appended {len(rows)} rows to {path}; all three rewards agree (max relative difference {worst:.1e})")
    return rows


if __name__ == "__main__":
    run()
