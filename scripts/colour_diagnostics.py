"""Colour diagnostics of the toy UMM: is the reward colour-sensitive, what does a policy draw, and can it learn to?

    python scripts/colour_diagnostics.py                                   # the shipped base only
    python scripts/colour_diagnostics.py --adapter runs/diag-col/adapter   # + a trained LoRA adapter
    python scripts/colour_diagnostics.py --probe                           # + the supervised probes (~2 min)
    python scripts/colour_diagnostics.py --base /tmp/pt/g0.2               # another base (gvu.toy.pretrain --out)

(1) For held-out colour prompts: the reward of a scene drawn to the prompt vs the same scene recoloured to each
other colour. (2) For three colour prompts, 64 samples each: objects per image and colours drawn, and the share
of samples with more than one object (a policy that hedges draws extra objects in other colours). (3) How much
of the variance of the 120 image-code rows of the output head (which generation samples through) and of the
input embeddings (which understanding reads) is explained by the code's shape, colour and size. (4) For held-out
prompts that name no colour, how much the reward of one scene varies with its colour alone. (5) With
--probe: supervised caption -> image fine-tuning on the `colors` tag's train prompts with correct scenes (the
best case for any reward), as a LoRA like the trainer's, a LoRA plus the trained head weight, and full
fine-tuning, scoring colour generation on train and held-out prompts every 100 steps.
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

from gvu.rewards import intrinsic_reward  # noqa: E402
from gvu.rollout import SamplingConfig  # noqa: E402
from gvu.toy import prompts as WP  # noqa: E402
from gvu.toy import world as W  # noqa: E402
from gvu.toy.backend import ToyUMM  # noqa: E402
from gvu.toy.pretrain import training_batch, training_loss  # noqa: E402

BASE = "gvu/assets/toy_umm"
PROMPTS = ["a photo of a red circle", "a photo of a blue star", "a photo of a green heart"]


def recoloured(scene: np.ndarray) -> np.ndarray:
    """Codes (36,) -> (10, 36): every object of the scene in colour c, for each of the ten colours."""
    variants = []
    for c in range(len(W.COLORS)):
        v = scene.copy()
        for i, code in enumerate(scene):
            if code:
                s, _, z = W.attrs_of(int(code))
                v[i] = W.code_of(s, c, z)
        variants.append(v)
    return np.stack(variants)


def recolour_table(adapter, model, n: int, seed: int) -> None:
    rng = random.Random(seed)
    _, evals = WP.make_prompt_sets(0)
    print("reward of the scene drawn to the prompt vs the same scene recoloured to each other colour")
    for meta in [m for m in evals if m["tag"] == "colors"][:n]:
        scene = W.sample_scene(meta, rng)
        want = W.COLORS.index(meta["include"][0]["color"])
        variants = recoloured(scene)
        images = torch.from_numpy(W.render(variants))
        r = intrinsic_reward(adapter, model, images, adapter.tokenize_prompts([meta["prompt"]] * len(variants)))
        others = [r[c].item() for c in range(len(W.COLORS)) if c != want]
        print(f"  {meta['prompt']:<32} true {r[want].item():.3f}   recoloured {min(others):.3f}-{max(others):.3f}")


def colour_pressure(adapter, model, seed: int = 0) -> None:
    """For held-out prompts that name no colour: the end-token reward of one scene recoloured 10 ways. A spread
    means GRPO groups of these prompts rank samples by colour alone, pulling each shape toward the teacher's
    favourite colours whatever a colour prompt asks for."""
    rng = random.Random(seed)
    _, evals = WP.make_prompt_sets(0)
    spreads, best = [], []
    print("reward (end token scored) of one scene recoloured to each colour, for prompts that name no colour")
    for meta in [m for m in evals if m["tag"] in ("single_object", "two_object", "counting")]:
        scene = W.sample_scene(meta, rng)
        variants = recoloured(scene)
        images = torch.from_numpy(W.render(variants))
        prompts = adapter.tokenize_prompts([meta["prompt"]] * len(variants))
        r = intrinsic_reward(adapter, model, images, prompts, with_eos=True)
        spreads.append((r.max() / r.min()).item())
        best.append(W.COLORS[int(r.argmax())])
        if len(spreads) <= 4:
            print(f"  {meta['prompt']:<34} " + " ".join(f"{W.COLORS[c][:3]} {r[c]:.2f}" for c in range(len(r))))
    print(f"  {len(spreads)} prompts: median max/min reward {float(np.median(spreads)):.2f}; "
          f"favourite colours {Counter(best).most_common(4)}")  # fmt: skip


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


def head_structure(model, adapter) -> None:
    """Share of the code rows' variance (about their mean) explained by each factor's group means."""
    rows = slice(adapter.code_offset + 1, adapter.code_offset + W.NUM_CODES)  # codes 1..120, not "empty"
    mats = {"output head (generation)": model.lm_head.weight, "input embeddings": model.model.embed_tokens.weight}
    attrs = [W.attrs_of(c) for c in range(1, W.NUM_CODES)]
    print("share of the code rows' variance explained by the code's attributes")
    for name, m in mats.items():
        x = m.detach()[rows].double()
        x = x - x.mean(0)
        total = (x**2).sum()
        shares = []
        for k, label in enumerate(("shape", "colour", "size")):
            keys = torch.tensor([a[k] for a in attrs])
            between = sum((keys == v).sum() * (x[keys == v].mean(0) ** 2).sum() for v in keys.unique())
            shares.append(f"{label} {between / total:.2f}")
        print(f"  {name:<26} " + "  ".join(shares))


def supervised_probe(base: str, steps: int = 300, seed: int = 0) -> None:
    """Caption -> image NLL on the `colors` train prompts with correct scenes; colour score every 100 steps."""
    from peft import LoraConfig, get_peft_model

    from gvu.config import LoraSettings as TrainerLora
    from gvu.toy.evaluator import generation_scores

    train, evals = WP.make_prompt_sets(0)
    tr = [m for m in train if m["tag"] == "colors"]
    ev = [m for m in evals if m["tag"] == "colors"]
    lora = TrainerLora()  # the trainer's defaults: r 16, alpha 32, every Linear of the decoder
    linears = lora.target_modules
    # (name, LoRA targets or None for full fine-tuning, lr, train the head's weight too). The head is trained as a
    # plain weight, not through a LoRA on lm_head: the loss reads head.weight directly, which a LoRA never reaches
    # "factorised": the head's code rows get a trained update S[shape] + C[colour] + Z[size] (zero at the start), so
    # a colour learned on train combinations moves every shape's row of that colour
    variants = [
        ("LoRA r16, lr 1.5e-3 (the trainer's)", linears, 1.5e-3, False),
        ("LoRA r16 + head weight, lr 1.5e-3", linears, 1.5e-3, True),
        ("LoRA r16 + factorised head update", linears, 1.5e-3, "factorised"),
        ("full fine-tuning, lr 1e-3", None, 1e-3, True),
    ]
    print(f"supervised probe: {len(tr)} train / {len(ev)} held-out `colors` prompts, 16 scenes per step")
    for name, targets, lr, head in variants:
        adapter, model = ToyUMM.from_pretrained(base)
        if targets:
            model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=targets))
        lm_head = model.get_output_embeddings()
        lm_head.weight.requires_grad_(head is True)
        if head == "factorised":
            adapter.add_image_head_update(model)  # the trainer's lora.image_head
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        rng = random.Random(seed)
        curve = []
        for step in range(steps + 1):
            if step % 100 == 0:
                a = generation_scores(adapter, model, tr[:16], samples_per_prompt=16)["overall"]
                b = generation_scores(adapter, model, ev, samples_per_prompt=16)["overall"]
                curve.append(f"{step}: {a:.2f}/{b:.2f}")
            if step == steps:
                break
            metas = [rng.choice(tr) for _ in range(16)]
            codes = torch.from_numpy(np.stack([W.sample_scene(m, rng) for m in metas]))
            ids, tg = training_batch(adapter, [m["prompt"] for m in metas], codes, [False] * len(metas))
            model.train()
            loss = training_loss(model, ids, tg)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"  {name:<36} colour score train/held-out by step  " + "  ".join(curve))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=BASE, help="the base checkpoint (a `python -m gvu.toy.pretrain --out` folder)")
    p.add_argument("--adapter", default="", help="a LoRA adapter folder (a run's adapter/) to compare with the base")
    p.add_argument("--prompts", type=int, default=10, help="held-out colour prompts in the recolour table")
    p.add_argument("--samples", type=int, default=64, help="samples per prompt in the drawing table")
    p.add_argument("--probe", action="store_true", help="also run the supervised probes (~2 min)")
    args = p.parse_args()
    torch.set_num_threads(1)
    adapter, base = ToyUMM.from_pretrained(args.base)
    recolour_table(adapter, base, args.prompts, seed=0)
    print("what the policy draws for colour prompts (64 seeded samples each)")
    samples_table(adapter, base, "base", args.samples)
    if args.adapter:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(ToyUMM.from_pretrained(args.base)[1], args.adapter)
        samples_table(adapter, tuned, "tuned", args.samples)
    head_structure(base, adapter)
    colour_pressure(adapter, base)
    if args.probe:
        supervised_probe(args.base)


if __name__ == "__main__":
    main()
