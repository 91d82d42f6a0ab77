"""One table over run records (folders holding a run's results.json): generation before -> after with the paired,
prompt-clustered z, chosen tags, caption accuracy, caption exact (true and stating every colour and relation of
its scene; a column only when a record has it, "-" in records made before it was measured) and the understanding's
true-vs-perturbed ranking per word type.

    python scripts/results_table.py docs/results/toy-default-rollout-loop docs/results/toy-joint-position ...
    python scripts/results_table.py --tags position,position_count,position_size <folders>

A folder's label is its name; `name=folder` sets another. Runs that started from another base measure their own
`before` (each row's gain is paired against it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gvu.evaluate import tag_stats  # noqa: E402

WORDS = ("count", "color", "position", "shape", "size")


def paired_gain(before: dict, after: dict) -> tuple[float, float]:
    """(delta of the overall score, its paired prompt-clustered stderr) of two generation summaries."""
    if before["prompts"] != after["prompts"]:
        raise ValueError("before and after scored different prompts: no paired gain")
    d = [a - b for a, b in zip(after["per_prompt"], before["per_prompt"], strict=True)]
    _, _, delta, se = tag_stats(before["tags"], d)
    return delta, se


def row(label: str, res: dict, tags: list[str], exact: bool) -> list[str]:
    b, a = res["before"], res["after"]
    gb, ga = b["generation"], a["generation"]
    delta, se = paired_gain(gb, ga)
    ub, ua = b["understanding"], a["understanding"]
    cells = [label, str(res.get("steps", "-")), f"{gb['overall']:.3f}", f"{ga['overall']:.3f} +- {ga['stderr']:.3f}",
             f"{delta / gb['overall']:+.0%} ({delta / se:.1f})" if se else f"{delta:+.3f}"]  # fmt: skip
    cells += [f"{gb['per_tag'].get(t, float('nan')):.2f} -> {ga['per_tag'].get(t, float('nan')):.2f}" for t in tags]
    cells.append(f"{ub['caption_acc']:.2f} -> {ua['caption_acc']:.2f}")
    if exact:  # records made before it was measured have none
        has = "caption_exact" in ub and "caption_exact" in ua
        cells.append(f"{ub['caption_exact']:.2f} -> {ua['caption_exact']:.2f}" if has else "-")
    for w in WORDS:
        rb, ra = ub["ranking"].get(w), ua["ranking"].get(w)
        cells.append("-" if rb is None or ra is None else f"{rb:.2f} -> {ra:.2f}")
    return cells


def table(folders: list[str], tags: list[str]) -> str:
    runs = []
    for f in folders:
        label, _, path = f.rpartition("=") if "=" in f else (Path(f).name, "", f)
        runs.append((label, json.loads((Path(path) / "results.json").read_text())))
    exact = any("caption_exact" in r["after"]["understanding"] for _, r in runs)  # the column only where measured
    head = ["run", "steps", "gen before", "gen after", "gain (z)", *tags, "caption acc",
            *(["caption exact"] if exact else []), *(f"rank {w}" for w in WORDS)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row(label, res, tags, exact)) + " |" for label, res in runs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="run records (results.json inside), optionally label=folder")
    p.add_argument("--tags", default="position", help="comma-separated generation tags shown as before -> after")
    args = p.parse_args(argv)
    print(table(args.folders, [t for t in args.tags.split(",") if t]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
