"""Pretrain the toy UMM of the shapes world on both directions, with a deliberately weaker generation side.

    python -m gvu.toy.pretrain --out gvu/assets/toy_umm

Each step draws a batch of (train prompt, scene consistent with it) pairs; a share `--gen-frac` become
caption -> image sequences (prompt dropped with probability `--drop-prompt`, so CFG's unconditional branch is
trained), the rest image -> caption sequences whose target is the same true prompt. The generation share and
the step budget are kept small so generation lags understanding (the paper's weak base). At the end the
generation table (eval prompts, 16 samples each) and the understanding scores are printed and saved as
pretrain_eval.json next to the checkpoint. Reproducible from --seed (single process, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch

import kernels
from gvu.evaluate import format_table
from gvu.models import backbone_and_head
from gvu.toy import prompts as WP
from gvu.toy import world as W
from gvu.toy.backend import ToyUMM
from gvu.toy.evaluator import generation_scores, understanding_scores
from gvu.toy.modeling import FactorisedCodeRows


def training_batch(backend: ToyUMM, texts: list[str | None], codes: torch.Tensor, understanding: list[bool]):
    """Right-padded pretraining sequences -> (input ids (N, L), target ids (N, L) with -100 unscored).

    Row i is the understanding sequence of (codes[i], texts[i]) when understanding[i], else the generation
    sequence; texts[i] None means the unconditional generation sequence. Targets: the codes of a
    generation row, the prompt words and <eos> of an understanding row (position t predicts token t+1).
    """
    seqs, tgts = [], []
    layouts = backend.image_layout(codes).tolist()
    for text, lay, und in zip(texts, layouts, understanding, strict=True):
        words = backend.encode_text(text) if text is not None else []
        if und:
            s = [backend.bos, backend.boi] + lay + [backend.eoi, backend.describe] + words + [backend.eos]
            scored = set(range(len(s) - len(words) - 1, len(s)))
        else:
            s = [backend.bos] + words + [backend.boi] + lay + [backend.eoi]
            start = len(words) + 2
            scored = {start + j for j in backend.code_slots.tolist()}
        seqs.append(s)
        tgts.append([s[j] if j in scored else -100 for j in range(len(s))])
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), backend.pad, dtype=torch.long)
    tg = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, tgts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        tg[i, : len(t) - 1] = torch.tensor(t[1:])  # the state at t predicts token t+1
    return ids, tg


def training_loss(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over scored positions (full vocabulary), fp32 scalar with grad."""
    body, head = backbone_and_head(model)
    h = body(input_ids=ids).last_hidden_state
    keep = targets != -100
    lp = kernels.linear_token_logprobs(h[keep], head.weight, targets[keep], bias=head.bias)
    return -lp.mean()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", default="gvu/assets/toy_umm", help="checkpoint directory (ToyUMM.from_pretrained)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompt sets, scenes and init")
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 because on the shared 2-core box a 2-thread step measured ~2x slower under load",
    )
    g.add_argument(
        "--kernel-backend",
        default="torch",
        choices=kernels.BACKENDS,
        help="kernels backend for the loss (torch: the reference; at vocab 165 it is as fast as any)",
    )
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=96, help="hidden size")
    g.add_argument("--layers", type=int, default=3, help="decoder layers")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--ffn", type=int, default=384, help="MLP size")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=3000, help="length of the learning-rate schedule")
    g.add_argument(
        "--stop-at", type=int, default=0, help="stop after this many steps (0: --steps); the weak base stops early"
    )
    g.add_argument("--batch", type=int, default=64, help="sequences per step")
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then cosine to 5%% of --lr")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument(
        "--gen-frac",
        type=float,
        default=0.06,
        help="share of caption -> image sequences (0.2 reached generation 0.21 by step 1000 while colour "
        "understanding was at chance; 0.06 leaves generation ~0.23 at the end with understanding strong)",
    )
    g.add_argument(
        "--color-weight",
        type=float,
        default=2.0,
        help="sampling weight of the four colour tags (others 1): colour words are in 4 of 11 tags and were the "
        "slowest word type to be understood",
    )
    g.add_argument("--drop-prompt", type=float, default=0.1, help="share of generation sequences without prompt")
    g.add_argument(
        "--head",
        default="free",
        choices=("free", "factorised"),
        help="image-code rows of lm_head: 'free' learns the 120 rows independently (the shipped base); "
        "'factorised' trains row(shape, colour, size) = S[shape] + C[colour] + Z[size], saved as a plain lm_head "
        "weight, so each colour is one direction shared by every shape (docs/results/toy-base-factorised)",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=750, help="quick evaluation every N steps (0: off)")
    g.add_argument("--final-samples", type=int, default=16, help="samples per eval prompt in the final table")
    g.add_argument("--snapshots", default="", help="directory for a checkpoint at every quick evaluation ('' off)")
    return p.parse_args(argv)


def plain_copy(model):
    """The model with any head parametrisation baked into an ordinary lm_head weight (for saving).

    A fresh model gets the state dict: deep-copying a parametrised module shares its generated class, and
    removing the parametrisation from the copy would strip `weight` from the original too.
    """
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(model.lm_head):
        return model
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    state["lm_head.weight"] = model.lm_head.weight.detach().clone()
    out = type(model)(model.config)
    out.load_state_dict(state)
    return out


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def draw_batch(adapter: ToyUMM, train: list[dict], by_tag: dict, rng: random.Random, args):
    """(input ids (N, L), targets (N, L), understanding bool (N,)): a tag (colour tags weighted by
    --color-weight, the rest uniform), then a prompt of it."""
    texts, codes, und = [], [], []
    tags = sorted(by_tag)
    weights = [args.color_weight if t.startswith("color") else 1.0 for t in tags]
    for _ in range(args.batch):
        meta = rng.choice(by_tag[rng.choices(tags, weights)[0]])
        codes.append(W.sample_scene(meta, rng))
        u = rng.random() >= args.gen_frac
        und.append(u)
        texts.append(None if (not u and rng.random() < args.drop_prompt) else meta["prompt"])
    ids, tg = training_batch(adapter, texts, torch.from_numpy(np.stack(codes)), und)
    return ids, tg, torch.tensor(und)


def step_loss(model, ids, tg, und):
    """(mean loss over scored tokens, understanding-token loss, generation-token loss); a direction absent from
    the batch gives NaN (logged with nanmean)."""
    body, head = backbone_and_head(model)
    h = body(input_ids=ids).last_hidden_state
    keep = tg != -100
    lp = kernels.linear_token_logprobs(h[keep], head.weight, tg[keep])
    row_und = und.unsqueeze(1).expand_as(tg)[keep]
    lu = -lp[row_und].mean().item() if row_und.any() else float("nan")
    lg = -lp[~row_und].mean().item() if (~row_und).any() else float("nan")
    return -lp.mean(), lu, lg


def main(argv=None):
    args = parse_args(argv)
    with kernels.use_backend(args.kernel_backend):
        run(args)


def run(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train, evals = WP.make_prompt_sets(args.seed)
    by_tag = {}
    for m in train:
        by_tag.setdefault(m["tag"], []).append(m)
    adapter, model = ToyUMM.new_model(
        seed=args.seed,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )
    if args.head == "factorised":
        from torch.nn.utils import parametrize

        parametrize.register_parametrization(
            model.lm_head, "weight", FactorisedCodeRows(adapter.code_offset, args.hidden)
        )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"toy UMM: {n_params / 1e6:.2f}M parameters, vocab {adapter.vocab_size}; {len(train)} train / "
        f"{len(evals)} eval prompts; {args.steps} steps x {args.batch}, gen share {args.gen_frac}",
        flush=True,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    model.train()
    t0 = time.time()
    tokens = 0
    hist = []
    stop = args.stop_at or args.steps
    for step in range(stop):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        ids, tg, und = draw_batch(adapter, train, by_tag, rng, args)
        loss, lu, lg = step_loss(model, ids, tg, und)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        hist.append((loss.item(), lu, lg))
        if (step + 1) % 100 == 0:
            mean = np.nanmean(hist[-100:], axis=0)
            el = time.time() - t0
            print(
                f"step {step + 1:5d}  loss {mean[0]:.3f}  und {mean[1]:.3f}  gen {mean[2]:.3f}  "
                f"lr {lr_at(step, args):.2e}  {tokens / el:,.0f} tok/s  {el / 60:.1f} min",
                flush=True,
            )
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < stop:
            g = generation_scores(adapter, model, evals, samples_per_prompt=4, seed=args.seed)
            u = understanding_scores(adapter, model, evals, seed=args.seed)
            rk = " ".join(f"{k} {v:.2f}" for k, v in u["ranking"].items())
            print(
                f"  eval @ {step + 1}: generation {g['overall']:.3f} +- {g['stderr']:.3f} (4/prompt)  "
                f"caption acc {u['caption_acc']:.3f}  ranking: {rk}",
                flush=True,
            )
            if args.snapshots:
                adapter.save_pretrained(os.path.join(args.snapshots, f"step{step + 1}"), plain_copy(model))
    train_min = (time.time() - t0) / 60
    model = plain_copy(model)
    model.eval()
    adapter.save_pretrained(args.out, model)
    gen = generation_scores(adapter, model, evals, samples_per_prompt=args.final_samples, seed=args.seed)
    und = understanding_scores(adapter, model, evals, seed=args.seed)
    print(f"\ntrained {stop} of {args.steps} scheduled steps in {train_min:.1f} min; saved {args.out}")
    print(f"generation on {gen['n_prompts']} eval prompts x {args.final_samples} samples:")
    print(format_table(gen))
    print(
        f"understanding: caption accuracy {und['caption_acc']:.3f}; true-vs-perturbed ranking "
        + ", ".join(f"{k} {v:.3f} (n={und['ranking_n'][k]})" for k, v in und["ranking"].items())
    )
    for p, c in und["examples"]:
        print(f"  scene of {p!r:60} -> caption {c!r}")
    with open(os.path.join(args.out, "pretrain_eval.json"), "w") as f:
        json.dump(
            {"args": vars(args), "train_minutes": train_min, "generation": gen, "understanding": und}, f, indent=1
        )


if __name__ == "__main__":
    main()
