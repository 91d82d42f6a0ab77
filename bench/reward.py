"""Reward throughput: gvu.reward.intrinsic_reward vs an eager full-logits pass vs the official GvU loop.

    python bench/reward.py                  # both models (--model toy|janus|all): 8, 64, 256 images; the
                                            # official loop on 8 of them; 5 repeats
    python bench/reward.py --quick          # 4 images per model, 1 repeat (the smoke test)

R(I, T) = exp(mean_j log p(T_j | [bos][boi] image [eoi][describe], T_<j)) for every (image, prompt) pair.
- ours: `intrinsic_reward`, one batched teacher-forced pass, lm_head only at prompt positions
  (kernels.linear_token_logprobs).
- eager_full: the same batched pass through `model(...).logits` (all positions x full vocabulary), then
  log_softmax + gather + masked mean.
- official: ANCHORS.md's `gvu_score`, one image at a time, one full forward of the whole prefix per prompt token
  (no KV cache), softmax over the full vocabulary, product of p(T_j), 1/L power.
For the tiny random Janus (_common.load_janus) the same three run on its understanding sequence
[bos] "<|User|>: " [boi] [image_placeholder] x 16 [eoi] "\nDescribe the image in detail.\n\n<|Assistant|>:" prompt
with pixel_values from JanusUMM.pixel_values: ours = intrinsic_reward with the Janus adapter (SigLIP features
spliced in, one pass, lm_head at prompt positions); eager_full and official call
`JanusForConditionalGeneration(input_ids=..., pixel_values=...)`, so each official per-token forward also reruns
SigLIP + aligner on the image, as a full forward of the whole prefix does.
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

from gvu import shapes_world as W  # noqa: E402
from gvu.reward import intrinsic_reward  # noqa: E402


def understanding_tokens(adapter, images, prompts):
    """Right-padded [bos][boi] image [eoi][describe] prompt: ids (N, P+Lmax), words (N, Lmax), mask (N, Lmax)."""
    codes = adapter.encode(images)
    n = codes.shape[0]
    pre = torch.cat(
        [
            torch.tensor([[adapter.bos, adapter.boi]]).expand(n, 2),
            adapter.image_layout(codes),
            torch.tensor([[adapter.eoi, adapter.describe]]).expand(n, 2),
        ],
        1,
    )
    words = [row[m].tolist() for row, m in zip(prompts.ids, prompts.mask, strict=True)]
    L = max(len(w) for w in words)
    tgt = torch.full((n, L), adapter.pad, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.bool)
    for i, w in enumerate(words):
        tgt[i, : len(w)] = torch.tensor(w)
        mask[i, : len(w)] = True
    return torch.cat([pre, tgt], 1), tgt, mask


@torch.no_grad()
def eager_full_reward(adapter, model, images, prompts) -> torch.Tensor:
    """Batched pass with logits at every position over the full vocabulary -> (N,) fp32."""
    ids, tgt, mask = understanding_tokens(adapter, images, prompts)
    P = ids.shape[1] - tgt.shape[1]
    logits = model(input_ids=ids).logits  # (N, P+L, V): all positions, as a plain HF forward gives
    logp = torch.log_softmax(logits.float(), -1)[:, P - 1 : -1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    m = mask.float()
    return ((logp * m).sum(-1) / m.sum(-1)).exp()


@torch.no_grad()
def official_reward(adapter, model, images, prompts) -> torch.Tensor:
    """The official GvU loop: per image, per prompt token, a full forward of the whole prefix (no cache) -> (N,)."""
    ids, tgt, mask = understanding_tokens(adapter, images, prompts)
    P = ids.shape[1] - tgt.shape[1]
    out = []
    for i in range(ids.shape[0]):
        L = int(mask[i].sum())
        prob = torch.ones((), dtype=torch.float32)
        for j in range(L):
            logits = model(input_ids=ids[i : i + 1, : P + j]).logits  # the whole prefix again, every token
            prob = prob * torch.softmax(logits[0, -1].float(), -1)[tgt[i, j]]
        out.append(prob ** (1.0 / L))
    return torch.stack(out)


def janus_understanding_tokens(adapter, images, prompts):
    """Janus understanding rows, right-padded, with placeholders for the image features:
    ids (N, P+Lmax), pixel_values (N, 3, S, S), targets (N, Lmax), mask (N, Lmax)."""
    words = [row[m].tolist() for row, m in zip(prompts.ids, prompts.mask, strict=True)]
    L = max(len(w) for w in words)
    pre = adapter._und_head + [adapter.image_token] * adapter.und_len + adapter._und_tail
    n, P = len(words), len(pre)
    ids = torch.full((n, P + L), adapter.pad, dtype=torch.long)
    ids[:, :P] = torch.tensor(pre)
    tgt = torch.full((n, L), adapter.pad, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.bool)
    for i, w in enumerate(words):
        ids[i, P : P + len(w)] = tgt[i, : len(w)] = torch.tensor(w)
        mask[i, : len(w)] = True
    return ids, adapter.pixel_values(images, "cpu", torch.float32), tgt, mask


@torch.no_grad()
def janus_eager_full_reward(adapter, model, images, prompts) -> torch.Tensor:
    """One batched HF forward (SigLIP + LM, logits at every position over the full vocabulary) -> (N,) fp32."""
    ids, pix, tgt, mask = janus_understanding_tokens(adapter, images, prompts)
    P = ids.shape[1] - tgt.shape[1]
    logits = model(input_ids=ids, pixel_values=pix).logits  # (N, P+L, V); right padding: causal, no mask needed
    logp = torch.log_softmax(logits.float(), -1)[:, P - 1 : -1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    m = mask.float()
    return ((logp * m).sum(-1) / m.sum(-1)).exp()


@torch.no_grad()
def janus_official_reward(adapter, model, images, prompts) -> torch.Tensor:
    """The official GvU loop on Janus: per image, per prompt token, a full HF forward of the whole prefix with its
    pixel_values (no cache), softmax over the full vocabulary, product, 1/L power -> (N,)."""
    ids, pix, tgt, mask = janus_understanding_tokens(adapter, images, prompts)
    P = ids.shape[1] - tgt.shape[1]
    out = []
    for i in range(ids.shape[0]):
        L = int(mask[i].sum())
        prob = torch.ones((), dtype=torch.float32)
        for j in range(L):
            logits = model(input_ids=ids[i : i + 1, : P + j], pixel_values=pix[i : i + 1]).logits
            prob = prob * torch.softmax(logits[0, -1].float(), -1)[tgt[i, j]]
        out.append(prob ** (1.0 / L))
    return torch.stack(out)


MODELS = {
    # name: (loader, eager full-logits baseline, official loop)
    "toy": (C.load_toy, eager_full_reward, official_reward),
    "janus": (C.load_janus, janus_eager_full_reward, janus_official_reward),
}


def make_batch(adapter, n: int, seed: int = 0):
    """n random images (uint8 pixels) and n prompts from the shapes world's train set (cycled)."""
    texts = [m["prompt"] for m in W.make_prompt_sets(0)[0]]
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, adapter.num_codes, (n, adapter.image_len), generator=g)
    return adapter.decode(codes), adapter.tokenize_prompts([texts[i % len(texts)] for i in range(n)])


def bench_model(name: str, args, info: dict) -> list[dict]:
    """Equality of the three rewards, then interleaved timings, at every batch size for one model -> CSV rows."""
    loader, eager_fn, official_fn = MODELS[name]
    adapter, model, src = loader()
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        images, prompts = make_batch(adapter, n)
        k = min(n, args.official_images)
        sub_images, sub_prompts = images[:k], prompts[:k]
        r_ours = intrinsic_reward(adapter, model, images, prompts)
        r_eager = eager_fn(adapter, model, images, prompts)
        r_off = official_fn(adapter, model, sub_images, sub_prompts)
        torch.testing.assert_close(r_eager, r_ours, rtol=1e-4, atol=1e-7, msg=f"{name}: eager_full != ours")
        torch.testing.assert_close(r_off, r_ours[:k], rtol=1e-4, atol=1e-7, msg=f"{name}: official != ours")
        max_rel = max(
            ((r_eager - r_ours).abs() / r_ours.abs()).max().item(),
            ((r_off - r_ours[:k]).abs() / r_ours[:k].abs()).max().item(),
        )
        t = C.time_interleaved(
            {
                "ours": lambda: intrinsic_reward(adapter, model, images, prompts),  # noqa: B023
                "eager_full": lambda: eager_fn(adapter, model, images, prompts),  # noqa: B023
                "official": lambda: official_fn(adapter, model, sub_images, sub_prompts),  # noqa: B023
            },
            warmup=args.warmup,
            repeats=args.repeats,
        )
        per_img = {"ours": t["ours"] / n, "eager_full": t["eager_full"] / n, "official": t["official"] / k}
        load = C.load_average()
        for impl in ("official", "eager_full", "ours"):
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
                    "max_rel_diff_vs_ours": max_rel,
                    "repeats": args.repeats,
                    "quick": args.quick,
                }
            )
    shapes = C.janus_shapes(adapter, model) if name == "janus" else f"{adapter.image_len} codes/image"
    print(
        f"reward {name} | {info['cpu']} | {info['threads']} threads | torch {info['torch']} | "
        f"transformers {info['transformers']} | {info['git_sha']} | model {src} | "
        f"{shapes} | load {C.load_average()}"
    )
    cols = ["images", "impl", "timed_images", "seconds", "ms_per_image", "images_per_s", "ours_speedup_vs_this"]
    print(C.table(rows, cols + ["loadavg"]))
    return rows


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 images, official on 2, 1 repeat: the smoke test")
    p.add_argument("--model", choices=["toy", "janus", "all"], default="all", help="which UMM(s) to measure")
    p.add_argument("--sizes", default="8,64,256", help="comma list of images per batch")
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

    info = C.machine_info()
    rows = []
    for name in ("toy", "janus") if args.model == "all" else (args.model,):
        rows += bench_model(name, args, info)
    path = C.append_csv("reward", rows, args.out)
    worst = max(r["max_rel_diff_vs_ours"] for r in rows)
    print(f"appended {len(rows)} rows to {path}; all three rewards agree (max relative difference {worst:.1e})")
    return rows


if __name__ == "__main__":
    run()
