"""X-Omni's two reward paths on the same generated codes: agreement (rank correlation) and speed.

    python bench/xomni_reward_paths.py            # 16 prompts x 4 samples, 3 repeats
    python bench/xomni_reward_paths.py --quick    # 4 x 2, 1 repeat (the smoke test)

- pixels (the paper's, baseline): decode = codes -> SigLIP-VQ features -> FLUX decoder (true CFG, empty prompt) ->
  uint8 pixels; reward = SigLIP-VQ re-encodes the pixels, the understanding turn scores the prompt on those codes.
- tokens (ours, an approximation): decode = the lossless code rendering; reward = the understanding turn scores
  the prompt on the generated codes themselves.
Both run the same understanding pass (intrinsic_reward); timed per batch as decode + reward, interleaved in one
process, ratio = pixels seconds / tokens seconds. Agreement: Spearman's rank correlation of the two rewards over
the batch (prompt-driven differences included), of the within-group deviations r - mean of its prompt's group
(what GRPO's advantages see), and the fraction of codes that survive decode -> re-encode. The model is the tiny X-Omni
(_common.load_xomni) with the tiny vision parts of tests/fixtures/xomni_vision_tiny: random weights, so the
decoder's pixels carry no meaning and the correlation is expected near 0; on the released weights it measures
how well the approximation tracks the paper's reward (a GPU run, not done here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import _common as C  # noqa: E402
import torch  # noqa: E402

from gvu.rewards import intrinsic_reward  # noqa: E402
from gvu.rollout import SamplingConfig  # noqa: E402
from gvu.toy import prompts as WP  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two (N,) tensors (ties broken by order)."""
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def run(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 prompts x 2 samples, 1 repeat")
    p.add_argument("--prompts", type=int, default=16, help="prompts (B)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--image-size", type=int, default=64, help="pixels a side (16 px a code)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--out", default=None, help="CSV path (default bench/results/xomni_reward_paths.csv)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.repeats = 4, 1
    info = C.machine_info()
    pix, model, src = C.load_xomni(args.image_size, "pixels")
    from gvu.models.xomni.backend import XOmniUMM

    tok = XOmniUMM(pix.tokenizer, pix.config, image_size=args.image_size)  # the same model, token path
    texts = [m["prompt"] for m in WP.make_prompt_sets(0)[0]][: args.prompts]
    prompts = pix.tokenize_prompts(texts)
    rows = prompts.repeat_interleave(args.samples)
    codes = pix.generate(model, prompts, args.samples, SamplingConfig(min_p=0.03), torch.Generator().manual_seed(0))

    def reward(backend):
        with torch.no_grad():
            return intrinsic_reward(backend, model, backend.decode(codes), rows)

    r_tok, r_pix = reward(tok), reward(pix)
    kept = (pix.codec.encode(pix.decode(codes))[0] == codes).float().mean().item()
    t = C.time_interleaved({"pixels": lambda: reward(pix), "tokens": lambda: reward(tok)}, 0, args.repeats)
    rho = spearman(r_tok, r_pix)
    G = args.samples
    dev_tok, dev_pix = (r - r.view(-1, G).mean(1).repeat_interleave(G) for r in (r_tok, r_pix))
    rho_group = spearman(dev_tok, dev_pix)
    n = codes.shape[0]
    out = [
        {
            **info, "bench": "xomni_reward_paths", "model": src, "images": n, "impl": impl,
            "baseline": "pixels", "seconds": t[impl], "images_per_s": n / t[impl],
            "speedup_vs_baseline": t["pixels"] / t[impl], "spearman_tokens_vs_pixels": rho,
            "spearman_within_group": rho_group,
            "codes_kept_by_decode_encode": kept, "decoder_steps": pix.codec.decoder.steps,
            "repeats": args.repeats, "quick": args.quick,
        }
        for impl in ("pixels", "tokens")
    ]  # fmt: skip
    print(f"xomni reward paths | {src} | {n} images | {info['cpu']} | {info['git_sha']} | load {C.load_average()}")
    cols = ["impl", "seconds", "images_per_s", "speedup_vs_baseline", "spearman_tokens_vs_pixels"]
    print(C.table(out, cols + ["spearman_within_group"]))
    print(f"codes kept by decode -> re-encode: {kept:.3f} (chance {1 / pix.num_codes:.3f}: random vision weights)")
    print(f"appended {len(out)} rows to {C.append_csv('xomni_reward_paths', out, args.out)}")
    return out


if __name__ == "__main__":
    run()
