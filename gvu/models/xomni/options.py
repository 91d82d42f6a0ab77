"""The X-Omni backend's own options and folder checks, read without loading weights.

Options beyond ModelConfig live in the checkpoint folder's optional `gvu_xomni.json` (absent: the defaults), so a
released folder loads as it is and the shared config keeps no backend-specific fields.
"""

from __future__ import annotations

import importlib.util
import json
import os

from gvu.models.xomni.codes import PATCH

OPTIONS_FILE = "gvu_xomni.json"
# option -> (default, help); 576 px = 36 x 36 codes is the released GRPO run's size (omni_r1/grpo.py)
OPTIONS = {
    "image_size": (576, "generated image side in pixels, a multiple of 16 (one code per 16 px)"),
    "reward_path": (
        "tokens", "tokens: the understanding turn reads the generated codes (an approximation of the paper); pixels: "
        "codes -> FLUX decoder -> pixels -> SigLIP-VQ -> codes (the paper's path; needs diffusers and flux_path)",
    ),
    "flux_path": ("", "pixels: FLUX.1-dev pipeline folder (VAE, CLIP, T5, scheduler); relative: to this folder"),
    "decode_seed": (0, "pixels: seed of every image's decoder noise (the same for each row, batch-independent)"),
}  # fmt: skip


def read_options(path: str) -> tuple[dict, list[str]]:
    """(options with defaults filled, problems) from `path`/gvu_xomni.json."""
    opts = {k: d for k, (d, _) in OPTIONS.items()}
    f = os.path.join(path, OPTIONS_FILE)
    if not os.path.exists(f):
        return opts, []
    try:
        given = json.loads(open(f).read())
    except json.JSONDecodeError as e:
        return opts, [f"{f}:{e.lineno}: not valid JSON: {e.msg}"]
    problems = [f"{f}: unknown option {k!r}; known: {sorted(OPTIONS)}" for k in given if k not in OPTIONS]
    opts.update({k: v for k, v in given.items() if k in OPTIONS})
    s = opts["image_size"]
    if not isinstance(s, int) or s < PATCH or s % PATCH:
        problems.append(f"{f}: image_size={s!r} must be a positive multiple of {PATCH} (one code per {PATCH} px)")
    if opts["reward_path"] not in ("tokens", "pixels"):
        problems.append(f"{f}: reward_path={opts['reward_path']!r} must be 'tokens' or 'pixels'")
    if opts["flux_path"]:
        opts["flux_path"] = os.path.join(path, opts["flux_path"])  # an absolute path stays as it is
    return opts, problems


def pixel_path_problems(path: str, opts: dict, config: dict) -> list[str]:
    """What reward_path 'pixels' lacks: diffusers, the vision_config and its weight files, the FLUX folder."""
    out = []
    if importlib.util.find_spec("diffusers") is None:
        out.append("reward_path 'pixels' needs diffusers (`pip install diffusers`), or use reward_path 'tokens'")
    vc = config.get("vision_config") or {}
    enc, dec = vc.get("encoder") or {}, vc.get("decoder") or {}
    if not enc or not dec:
        return out + [f"{path}/config.json has no vision_config with encoder and decoder: not a released X-Omni"]
    for key in ("siglip_path", "projector_path"):
        if not os.path.exists(os.path.join(path, enc.get(key, "?"))):
            out.append(f"vision_config.encoder.{key}={enc.get(key)!r}: no such file in {path}")
    if not os.path.exists(os.path.join(path, dec.get("model_path", "?"), "config.json")):
        out.append(f"vision_config.decoder.model_path={dec.get('model_path')!r}: no decoder transformer in {path}")
    if not opts["flux_path"] or not os.path.exists(os.path.join(opts["flux_path"], "model_index.json")):
        out.append(
            f"{OPTIONS_FILE}: flux_path={opts['flux_path']!r} must be a FLUX.1-dev pipeline folder (model_index.json"
            "; the decoder's VAE, CLIP and T5 come from it, as in the released init_vision)"
        )
    return out


def folder_problems(path: str) -> list[str]:
    """Why `path` is not an X-Omni folder the backend can load (config, tokenizer, options, pixel path), or []."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        return [f"{path}: no such folder (X-Omni loads from a local folder, e.g. a download of X-Omni/X-Omni-En)"]
    if not os.path.exists(cfg_path):
        return [f"{cfg_path} missing: not an X-Omni checkpoint folder"]
    config = json.loads(open(cfg_path).read())
    out = (
        []
        if config.get("model_type") == "x-omni"
        else [f"{cfg_path}: model_type={config.get('model_type')!r}, not 'x-omni'"]
    )
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        out.append(f"{path}: no tokenizer.json / tokenizer_config.json (the released folder ships its tokenizer)")
    opts, problems = read_options(path)
    if opts["reward_path"] == "pixels":
        problems += pixel_path_problems(path, opts, config)
    return out + problems
