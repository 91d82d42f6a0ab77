"""Generations in GenEval's folder layout, for scoring with the official evaluator (djghosh13/geneval).

    python -m gvu.geneval --config configs/janus_pro_7b.yaml --metadata evaluation_metadata.jsonl --out gen/base
    python -m gvu.geneval --config configs/janus_pro_7b.yaml --metadata evaluation_metadata.jsonl --out gen/gvu \\
        --adapter runs/gvu-janus-pro-7b/adapter --samples 4 --sampling.cfg_scale=5
    python evaluation/evaluate_images.py gen/gvu --outfile results.jsonl --model-path <detector>   # in geneval

Writes <out>/NNNNN/metadata.jsonl (the prompt's metadata line) and <out>/NNNNN/samples/0000.png ... for prompt
line NNNNN. Each prompt folder is written to a temporary folder and renamed when complete, so a killed run
resumes where it stopped (finished folders are skipped). Works for any registered backend; sampling settings
come from the config's `sampling` section (override with --sampling.field=value).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

from gvu.config import ConfigError, load_config
from gvu.data import read_jsonl_lines
from gvu.metrics import atomic_dir
from gvu.models import backend_class


def is_done(folder: Path, samples: int) -> bool:
    return (folder / "metadata.jsonl").exists() and all(
        (folder / "samples" / f"{k:04d}.png").exists() for k in range(samples)
    )


def load_model(cfg, adapter_path: str | None, device: torch.device, part: str = "generation"):
    """(backend, model in eval mode on `device`), with a trained adapter (LoRA merged, and the image-head update
    when the run trained one) when given. A lora.scope=split folder holds two adapters: `part` generation merges
    the generation one (and the image-head update), understanding the understanding one (its subfolder) alone."""
    from gvu.models import POLICY_UPDATES_FILE, UNDERSTANDING_ADAPTER, Ability, load_policy_updates, load_umm, require

    backend, model = load_umm(cfg.model)
    if adapter_path:
        from peft import PeftModel

        folder = Path(adapter_path)
        if not (folder / "adapter_config.json").exists():
            raise ConfigError(f"--adapter {adapter_path}: no adapter_config.json (pass a run's adapter/ folder)")
        if part == "understanding":
            if not (folder / UNDERSTANDING_ADAPTER / "adapter_config.json").exists():
                raise ConfigError(f"--adapter {adapter_path} has no {UNDERSTANDING_ADAPTER}/ adapter: only a "
                                  "lora.scope=split run trains one; merge its generation part instead")  # fmt: skip
            return backend, PeftModel.from_pretrained(model, str(folder / UNDERSTANDING_ADAPTER)).merge_and_unload(
            ).to(device).eval()  # fmt: skip
        model = PeftModel.from_pretrained(model, adapter_path)
        if (folder / POLICY_UPDATES_FILE).exists():  # the run also trained the image head (lora.image_head)
            missing = require(backend, Ability.IMAGE_HEAD_UPDATE)
            if missing:
                raise ConfigError(f"--adapter {adapter_path} holds {POLICY_UPDATES_FILE}, but {missing}")
            backend.add_image_head_update(model)
            load_policy_updates(model, folder)
        model = model.merge_and_unload()
    return backend, model.to(device).eval()


def write_png(path: Path, image) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def export(adapter, model, metas: list[tuple[str, dict]], out: Path, samples: int, sampling, batch: int, seed: int):
    """Generate and write every unfinished prompt folder; returns the number of prompts written."""
    device = next(model.parameters()).device
    todo = [i for i in range(len(metas)) if not is_done(out / f"{i:05d}", samples)]
    for b in range(0, len(todo), batch):
        idx = todo[b : b + batch]
        prompts = adapter.tokenize_prompts([metas[i][1]["prompt"] for i in idx], device=device)
        # seeded by the first prompt of the batch: a resumed run with the same --batch redraws the same images
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + idx[0])
        with torch.no_grad():
            images = adapter.decode(adapter.generate(model, prompts, samples, sampling, generator=gen))
        for j, i in enumerate(idx):
            with atomic_dir(out / f"{i:05d}") as tmp:
                (tmp / "metadata.jsonl").write_text(metas[i][0] + "\n")
                (tmp / "samples").mkdir()
                for k in range(samples):
                    write_png(tmp / "samples" / f"{k:04d}.png", images[j * samples + k])
        print(f"{min(b + batch, len(todo))}/{len(todo)} prompts written ({len(metas) - len(todo)} already done)")
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Write generations in GenEval's layout (<out>/NNNNN/metadata.jsonl, samples/0000.png, ...).",
        epilog="Any config field can be overridden as --section.field=value, e.g. --sampling.cfg_scale=5.",
    )
    p.add_argument("--config", required=True, help="experiment YAML (model and sampling sections are used)")
    p.add_argument("--metadata", required=True, help="GenEval evaluation_metadata.jsonl (one prompt per line)")
    p.add_argument("--out", required=True, help="output folder (resumable: finished prompt folders are skipped)")
    p.add_argument("--adapter", default=None, help="trained LoRA adapter folder (a run's adapter/), merged in")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (GenEval uses 4)")
    p.add_argument("--batch", type=int, default=1, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args, rest = p.parse_known_args(argv)
    try:
        if args.samples < 1 or args.batch < 1:
            raise ConfigError("--samples and --batch must be >= 1")
        cfg = load_config(args.config, rest)
        metas = read_jsonl_lines(Path(args.metadata), "--metadata")
        backend_cls = backend_class(cfg.model.backend)
        problems = backend_cls.check_config(cfg.model) + backend_cls.check_prompts(
            cfg.model, [m["prompt"] for _, m in metas]
        )
        if problems:
            raise ConfigError(problems)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        adapter, model = load_model(cfg, args.adapter, device)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    n = export(adapter, model, metas, Path(args.out), args.samples, cfg.sampling, args.batch, args.seed)
    print(f"{args.out}: {len(metas)} prompts x {args.samples} samples ({n} written now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
