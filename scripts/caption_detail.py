"""How much the toy's greedy captions say, not only whether they hold: caption accuracy counts a caption that
parses and holds for its scene, so a captioner can raise it by saying less ("a star and a cross" for a pink star
and a black cross). Per model, on the evaluator's held-out scenes (the same draw as caption accuracy):

    accuracy      the caption holds for the scene (caption accuracy)
    colours       of the scene's objects, the share whose colour the caption names
    relations     of the scenes of position prompts (one stated relation), the share whose caption states one
    exact         the caption holds and states every such fact (gvu/toy/questions.caption_facts; the captioning
                  task's reward is 1 exactly then)

    python scripts/caption_detail.py gvu/assets/toy_umm runs/merged-split-captions-und [...]

A lora.scope=split run's understanding is its `python -m gvu.merge --part understanding` folder.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gvu.toy import prompts as WP  # noqa: E402
from gvu.toy import world as W  # noqa: E402
from gvu.toy.backend import ToyUMM  # noqa: E402
from gvu.toy.questions import caption_facts, caption_holds  # noqa: E402


def detail(folder: str, seed: int = 0) -> dict[str, float]:
    """The four shares above for the checkpoint in `folder` (the evaluator's scene draw for train.seed 0)."""
    backend, model = ToyUMM.from_pretrained(folder)
    metas = WP.make_prompt_sets(0)[1]
    rng = random.Random(seed)
    scenes = np.stack([W.sample_scene(m, rng) for m in metas])
    captions = backend.caption(model, W.render(scenes))
    ok, colours, named, rel, stated, exact = [], 0, 0, 0, 0, []
    for cap, m, sc in zip(captions, metas, scenes, strict=True):
        holds = caption_holds(cap, sc)
        ok.append(holds)
        says, facts = caption_facts(cap, m)
        related = any(e.get("position") for e in m["include"])
        says_rel = related and any(e.get("position") for e in (WP.parse_prompt(cap) or {"include": []})["include"])
        colours += facts - related
        named += says - says_rel
        rel += related
        stated += says_rel
        exact.append(holds and says == facts)
    return {"accuracy": float(np.mean(ok)), "colours": named / max(colours, 1), "relations": stated / max(rel, 1),
            "exact": float(np.mean(exact)), "scenes": len(metas)}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="toy checkpoint folders (a base, or a merged run)")
    args = p.parse_args(argv)
    print("| model | accuracy | colours named | relations stated | exact |\n|---|---|---|---|---|")
    for f in args.folders:
        d = detail(f)
        print(f"| {f} | {d['accuracy']:.3f} | {d['colours']:.3f} | {d['relations']:.3f} | {d['exact']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
