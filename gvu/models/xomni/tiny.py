"""Tiny X-Omni vision parts for CPU tests (no download): the ones tests/fixtures/xomni_vision_tiny holds (random
weights saved by the released code, scripts/make_xomni_vision_fixture.py), laid out as a released X-Omni folder
does (vision_config in config.json, torch.load weight files, the decoder's transformer in a subfolder) plus a FLUX
pipeline folder (VAE, CLIP, T5, scheduler)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "xomni_vision_tiny"


def vision_config(image_px: int) -> dict:
    """The released vision_config layout for the fixture's parts (decoder: 2 steps, true CFG 2)."""
    meta = json.loads((FIXTURE / "meta.json").read_text())
    return {
        "dtype": "float32",
        "transform": {**meta["transform"], "short_size": image_px, "long_size": 4 * image_px},
        "encoder": {
            "siglip_name": "siglip2_giant_patch16_384", "gvu_vit": meta["vit"], "siglip_path": "vit.pt",
            "projector_path": "projector.pt", "z_channels": meta["z_channels"],
            "codebook_size": meta["codebook_size"], "codebook_dim": meta["codebook_dim"],
        },
        "decoder": {"model_path": "decoder", "upscale_factor": 16, "num_inference_steps": meta["decode"]["steps"],
                    "cfg_scale": meta["decode"]["true_cfg"]},
    }  # fmt: skip


def write_tiny_vision(xomni_path: str, flux_path: str, image_px: int = 64) -> None:
    """The fixture's SigLIP-VQ weights and decoder transformer into the X-Omni folder (its config.json gains
    vision_config; its codebook must have the model's image_vocab_size codes), the FLUX pipeline to flux_path."""
    cfg_path = os.path.join(xomni_path, "config.json")
    cfg = json.loads(open(cfg_path).read())
    cfg["vision_config"] = vc = vision_config(image_px)
    if vc["encoder"]["codebook_size"] != cfg["image_vocab_size"]:
        raise ValueError(
            f"the fixture's codebook has {vc['encoder']['codebook_size']} codes, the model {cfg['image_vocab_size']}"
        )
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    for name in ("vit.pt", "projector.pt"):
        shutil.copy(FIXTURE / name, os.path.join(xomni_path, name))
    shutil.copytree(FIXTURE / "decoder", os.path.join(xomni_path, "decoder"), dirs_exist_ok=True)
    shutil.copytree(FIXTURE / "flux", flux_path, dirs_exist_ok=True)
