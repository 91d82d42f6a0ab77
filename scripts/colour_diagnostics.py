"""Colour diagnostics of the toy UMM: is the reward colour-sensitive, and what does a trained policy draw?

    python scripts/colour_diagnostics.py                                   # the shipped base only
    python scripts/colour_diagnostics.py --adapter runs/diag-col/adapter   # + a trained LoRA adapter

(1) For held-out colour prompts: the reward of a scene drawn to the prompt vs the same scene recoloured to each
other colour. (2) For three colour prompts, 64 samples each: objects per image and colours drawn, and the share
of samples with more than one object (a policy that hedges draws extra objects in other colours).
Recreate the adapter of README "Results" with `deepspeed gvu/train.py docs/results/toy-diag-colors-only/config.yaml`.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gvu import shapes_world as W  # noqa: E402
from gvu.models.toy import ToyUMM  # noqa: E402
from gvu.reward import intrinsic_reward  # noqa: E402
from gvu.rollout import SamplingConfig  # noqa: E402

BASE = "gvu/assets/toy_umm"
PROMPTS = ["a photo of a red circle", "a photo of a blue star", "a photo of a green heart"]


def recolour_table(adapter, model, n: int, seed: int) -> None:
    rng = random.Random(seed)
    _, evals = W.make_prompt_sets(0)
    print("reward of the scene drawn to the prompt vs the same scene recoloured to each other colour")
    for meta in [m for m in evals if m["tag"] == "colors"][:n]:
        scene = W.sample_scene(meta, rng)
        want = W.COLORS.index(meta["include"][0]["color"])
        variants = []
        for c in range(len(W.COLORS)):
            v = scene.copy()
            for i, code in enumerate(scene):
                if code:
                    s, _, z = W.attrs_of(int(code))
                    v[i] = W.code_of(s, c, z)
            variants.append(v)
        images = torch.from_numpy(W.render(np.stack(variants)))
        r = intrinsic_reward(adapter, model, images, adapter.tokenize_prompts([meta["prompt"]] * len(variants)))
        others = [r[c].item() for c in range(len(W.COLORS)) if c != want]
        print(f"  {meta['prompt']:<32} true {r[want].item():.3f}   recoloured {min(others):.3f}-{max(others):.3f}")


def samples_table(adapter, model, name: str, samples: int) -> None:
    multi = 0
    for prompt in PROMPTS:
        gen = torch.Generator().manual_seed(0)
        codes = adapter.generate(model, adapter.tokenize_prompts([prompt]), samples, SamplingConfig(), generator=gen)
        objs = [W.objects_of(c.numpy()) for c in codes]
        multi += sum(len(o) > 1 for o in objs)
        n_obj = sorted(Counter(len(o) for o in objs).items())
        colours = Counter(o["color"] for ob in objs for o in ob).most_common(4)
        print(f"  {name:<5} {prompt:<26} objects/image {n_obj}  colours {colours}")
    print(f"  {name:<5} samples with more than one object: {multi / (samples * len(PROMPTS)):.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="", help="a LoRA adapter folder (a run's adapter/) to compare with the base")
    p.add_argument("--prompts", type=int, default=10, help="held-out colour prompts in the recolour table")
    p.add_argument("--samples", type=int, default=64, help="samples per prompt in the drawing table")
    args = p.parse_args()
    torch.set_num_threads(1)
    adapter, base = ToyUMM.from_pretrained(BASE)
    recolour_table(adapter, base, args.prompts, seed=0)
    print("what the policy draws for colour prompts (64 seeded samples each)")
    samples_table(adapter, base, "base", args.samples)
    if args.adapter:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(ToyUMM.from_pretrained(BASE)[1], args.adapter)
        samples_table(adapter, tuned, "tuned", args.samples)


if __name__ == "__main__":
    main()
