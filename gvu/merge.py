"""A trained run's adapter merged into its base: a plain checkpoint folder that any config's `model.path` can load.

    python -m gvu.merge --config runs/gvu-toy/config.yaml --adapter runs/gvu-toy/adapter --out runs/merged

The LoRA is merged with peft's `merge_and_unload`, and a trained image-head update (`lora.image_head`, the
adapter folder's policy-updates file) is folded into the head's weight, so the folder holds the base's layout
with the run's weights: a second run can start from it (e.g. GvU from a model that joint RL trained,
docs/results). Weights are written by `save_pretrained` (safetensors); the base folder's other files (tokenizer,
world / processor files) are copied over, except its weights, config.json and the base's own pretraining logs.
A merged model applies the update in every pass: a `lora.scope: generation` run's understanding passes ran without
it, so its merge is not the same model for understanding (a `lora.scope: all` run's is). A `lora.scope: split`
run trained one adapter per direction, which one set of weights cannot hold: `--part generation` merges its
generation adapter (and image-head update), `--part understanding` its understanding adapter alone (a model that
understands as the run's understanding did and generates as the base: GvU from it isolates what the trained
understanding teaches generation).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from gvu.config import ConfigError, load_config, resolve_path

SKIPPED = ("config.json", "pretrain.log", "pretrain_eval.json")  # rewritten, or facts of the base, not of the merge


def fold_parametrizations(model) -> int:
    """Replace every parametrized weight (the image-head update) by its current value; returns how many."""
    from torch.nn.utils import parametrize

    n = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                n += 1
    return n


def merge(cfg, adapter_path: str, out: Path, part: str | None = None) -> Path:
    """Write base + adapter (merged) into `out` (must not exist) and return it; `part` (generation / understanding)
    is required for a lora.scope=split run's folder and refused otherwise."""
    import torch

    from gvu.geneval import load_model
    from gvu.models import UNDERSTANDING_ADAPTER

    if out.exists():
        raise ConfigError(f"--out {out} exists: pass a new folder (nothing is overwritten)")
    split = (Path(adapter_path) / UNDERSTANDING_ADAPTER / "adapter_config.json").exists()
    if split and part is None:
        raise ConfigError(f"--adapter {adapter_path} holds a lora.scope=split run's two adapters: pass --part "
                          "generation or --part understanding (one set of weights holds one of them)")  # fmt: skip
    if not split and part is not None:
        raise ConfigError(f"--part {part}: --adapter {adapter_path} holds one adapter (no {UNDERSTANDING_ADAPTER}/); "
                          "drop --part")  # fmt: skip
    base = Path(resolve_path(cfg.model.path))
    backend, model = load_model(cfg, adapter_path, torch.device("cpu"), part or "generation")
    fold_parametrizations(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backend.save_pretrained(str(tmp), model)  # each backend writes its layout's files (tokenizer, world, VQ)
    for f in base.iterdir():
        weights = f.suffix in (".safetensors", ".bin") or f.name.endswith(".safetensors.index.json")
        if f.is_file() and not weights and f.name not in SKIPPED and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)  # a killed merge leaves only the .tmp folder
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Config fields can be overridden as --section.field=value.")  # fmt: skip
    p.add_argument("--config", required=True, help="the run's config.yaml (its model section names the base)")
    p.add_argument("--adapter", required=True, help="the run's adapter/ folder")
    p.add_argument("--out", required=True, help="new folder for the merged checkpoint")
    p.add_argument(
        "--part",
        choices=("generation", "understanding"),
        help="a lora.scope=split run's adapter to merge (required for such a run, refused otherwise)",
    )
    args, rest = p.parse_known_args(argv)
    try:
        out = merge(load_config(args.config, rest), args.adapter, Path(args.out), args.part)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
