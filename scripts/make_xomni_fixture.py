"""Build tests/fixtures/xomni_tiny with the *released* X-Omni code: a tiny random checkpoint and its recorded outputs.

Run it in the released code's own environment (transformers 4.51.3), never in the project's:

    python -m venv /work/venv-xomni
    /work/venv-xomni/bin/pip install torch==2.13.0 transformers==4.51.3 safetensors numpy
    /work/venv-xomni/bin/python scripts/make_xomni_fixture.py \\
        --released /tmp/xomni_released --out tests/fixtures/xomni_tiny

`--released` is a copy of the official GvU repository's `omni_r1/models/` folder (configuration_xomni.py,
modeling_xomni.py, modeling_siglip_tokenizer.py, modeling_vit.py, modeling_siglip_flux.py). The files are imported
as they are, never edited: `modeling_xomni` imports the three vision modules at module level but uses them only in
`init_vision` (image tokenizer + FLUX decoder), which the fixture never calls. By default the script puts stand-in
modules for those three into `sys.modules` before the import (their real imports need torchvision, timm and diffusers;
the PyPI torchvision builds are CUDA builds that fail to load against the CPU torch here). With `--real-vision` it
imports the real ones and stubs only `flash_attn` (imported at module level by modeling_vit.py, not buildable here).

Recorded in `recorded.safetensors` (fp32, batch-first):
    mixed_ids (1, L)                     text + <SOM>H W<IMAGE> + H*W codes + <EOM> + text
    hidden (1, L, hidden)                XOmniModel's last_hidden_state (after lm_norm / mm_norm)
    logits_text, logits_image (1, L, vocab_size + mm_vocab_size)   set_generation_mode('text' | 'image')
    gen_prompt_ids, gen_attention_mask (2, P)   two left-padded prompts, each ending in <SOM>H W<IMAGE>
    gen_greedy (2, P + H*W)              greedy image-mode generate (suppress_tokens = the mm specials), no CFG
    gen_cfg_prompt_ids (1, P1), gen_cfg_negative_ids (1, 5), gen_cfg (1, P1 + H*W)   greedy with CFG (scale 3)
    gen_sample (4, P + H*W)              sampled as the GRPO rollout (min-p 0.03, 2 per prompt), torch seed 1234
`meta.json` holds the token layout, generation settings, versions and the smallest greedy top-2 margin.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import torch

PKG = "xomni_released"
# Token layout of the tiny fixture (the released tokenizer is not needed: ids are written directly).
VOCAB, IMAGE_VOCAB, MM_VOCAB = 64, 32, 40  # text ids [0, 64); image code k is id 64 + k; mm ids [64, 104)
SOM, EOM, IMG = VOCAB + IMAGE_VOCAB, VOCAB + IMAGE_VOCAB + 1, VOCAB + IMAGE_VOCAB + 2  # mm specials after the codes
DIGIT0, SPACE, PAD = 10, 20, 0  # '0'..'9' -> 10..19, ' ' -> 20, pad -> 0
H = W = 4
CFG_SCALE = 3.0
SAMPLE_SEED = 1234


def load_released(folder: Path, real_vision: bool):
    """Import the released omni_r1/models folder as package `xomni_released`, unedited; returns the package."""
    if real_vision:
        flash = types.ModuleType("flash_attn")  # the ViT only calls these inside its attention forward

        def _no_flash(*a, **k):
            raise RuntimeError("flash_attn is stubbed by make_xomni_fixture.py")

        flash.flash_attn_func = flash.flash_attn_varlen_func = _no_flash
        sys.modules["flash_attn"] = flash
    else:
        stubs = {
            "modeling_siglip_tokenizer": ("create_anyres_preprocess", "SiglipTokenizer"),
            "modeling_siglip_flux": ("FluxTransformer2DModelWithSigLIP", "FluxPipelineWithSigLIP"),
            "modeling_vit": ("create_siglip_vit",),
        }
        for mod, names in stubs.items():
            m = types.ModuleType(f"{PKG}.{mod}")
            for n in names:
                setattr(m, n, type(n, (), {"__init__": _stub_init(mod)}))
            sys.modules[f"{PKG}.{mod}"] = m
    spec = importlib.util.spec_from_file_location(PKG, folder / "__init__.py", submodule_search_locations=[str(folder)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PKG] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def _stub_init(mod):
    def init(self, *a, **k):
        raise RuntimeError(f"{mod} is a stand-in (make_xomni_fixture.py); rerun with --real-vision")

    return init


def tiny_config(pkg):
    """Every code path runs: 2 adapter + 1 head layer (asymmetric on purpose), GQA, all 6 layers distinct."""
    return pkg.XOmniConfig(
        vocab_size=VOCAB,
        mm_vocab_size=MM_VOCAB,
        image_vocab_size=IMAGE_VOCAB,
        num_mm_adap_layers=2,
        num_mm_head_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        pad_token_id=PAD,
        torch_dtype="float32",
    )


def randomize(model, seed: int):
    """Overwrite every parameter with O(1)-scale noise so that logits are well separated (greedy argmax is robust to
    1e-6 implementation differences) and lm_norm / mm_norm and both embeddings are all distinguishable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.ndim == 1:  # q/k/v biases
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 * (4.0 if "head" in name else 1.0))


def number(n: int) -> list[int]:
    return [DIGIT0 + int(c) for c in str(n)]


def image_prefix(h: int, w: int) -> list[int]:
    """<SOM>{h} {w}<IMAGE>: the released generation prefix (the digits and the space are text tokens)."""
    return [SOM, *number(h), SPACE, *number(w), IMG]


def mixed_sequence(g: torch.Generator) -> torch.Tensor:
    codes = (VOCAB + torch.randint(0, IMAGE_VOCAB, (H * W,), generator=g)).tolist()
    text_a = torch.randint(1, VOCAB, (5,), generator=g).tolist()
    text_b = torch.randint(1, VOCAB, (4,), generator=g).tolist()
    return torch.tensor([text_a + image_prefix(H, W) + codes + [EOM] + text_b])


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, rows))
    ids = torch.tensor([[PAD] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def released_generate(model, ids, mask, negative_ids=None, **settings):
    """The released generate call (batch_generate.py / grpo_trainer.py): image mode, h*w new tokens, the mm specials
    suppressed, `negative_prompt_ids` for CFG; `settings` go into its GenerationConfig."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        max_new_tokens=H * W,
        suppress_tokens=[SOM, EOM, IMG],
        pad_token_id=PAD,
        output_scores=True,
        return_dict_in_generate=True,
        **settings,
    )
    kw = {} if negative_ids is None else {"negative_prompt_ids": negative_ids}
    return model.generate(inputs=ids, attention_mask=mask, generation_config=cfg, **kw)


def greedy(model, ids, mask, negative_ids=None, **settings):
    """-> (sequences, the smallest top-2 score margin over all steps)."""
    out = released_generate(model, ids, mask, negative_ids, do_sample=False, **settings)
    top2 = torch.stack(out.scores, 1).float().topk(2, dim=-1).values  # (B, T, 2)
    return out.sequences, (top2[..., 0] - top2[..., 1]).min().item()


def record(model) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(1)
    out, meta = {}, {}
    with torch.no_grad():
        ids = mixed_sequence(g)
        out["mixed_ids"] = ids
        out["hidden"] = model.model(input_ids=ids).last_hidden_state
        for mode in ("text", "image"):
            model.set_generation_mode(mode)
            out[f"logits_{mode}"] = model(input_ids=ids).logits

        model.set_generation_mode("image")
        prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() + image_prefix(H, W) for n in (7, 3)]
        p_ids, p_mask = left_pad(prompts)
        out["gen_prompt_ids"], out["gen_attention_mask"] = p_ids, p_mask
        out["gen_greedy"], meta["gen_greedy_min_margin"] = greedy(model, p_ids, p_mask)

        c_ids = torch.tensor([torch.randint(1, VOCAB, (6,), generator=g).tolist() + image_prefix(H, W)])
        neg = torch.tensor([image_prefix(H, W)])
        out["gen_cfg_prompt_ids"], out["gen_cfg_negative_ids"] = c_ids, neg
        out["gen_cfg"], meta["gen_cfg_min_margin"] = greedy(
            model, c_ids, torch.ones_like(c_ids), neg, guidance_scale=CFG_SCALE
        )

        # The GRPO rollout's sampler (grpo_trainer.py defaults): min-p 0.03, temperature 1, top-p 1, G samples a prompt.
        torch.manual_seed(SAMPLE_SEED)
        out["gen_sample"] = released_generate(
            model, p_ids, p_mask, do_sample=True, temperature=1.0, min_p=0.03, top_p=1.0, num_return_sequences=2
        ).sequences
        model.set_generation_mode("text")
    return {k: v.contiguous() for k, v in out.items()}, meta


def git_commit(folder: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--released", type=Path, required=True, help="the released omni_r1/models folder (a copy)")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/xomni_tiny"), help="fixture folder to write")
    ap.add_argument(
        "--seed",
        type=int,
        default=3,
        help="seed of the random weights (3: of seeds 0-4 the one with the most varied greedy rows)",
    )
    ap.add_argument("--released-commit", default=None, help="commit of the GvU repo the copy was taken from")
    ap.add_argument("--real-vision", action="store_true", help="import the real vision modules (stub flash_attn only)")
    args = ap.parse_args()

    import safetensors
    import transformers
    from safetensors.torch import save_file

    pkg = load_released(args.released.resolve(), args.real_vision)
    torch.manual_seed(args.seed)
    model = pkg.XOmniForCausalLM(tiny_config(pkg)).eval()
    randomize(model, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tensors, meta = record(model)

    # The saved folder must reproduce the recording through the released loader too.
    again = pkg.XOmniForCausalLM.from_pretrained(args.out).eval()
    with torch.no_grad():
        for mode in ("text", "image"):
            again.set_generation_mode(mode)
            torch.testing.assert_close(
                again(input_ids=tensors["mixed_ids"]).logits, tensors[f"logits_{mode}"], rtol=0, atol=0
            )
    for k in ("gen_greedy_min_margin", "gen_cfg_min_margin"):
        if meta[k] < 1e-3:
            raise SystemExit(f"{k}={meta[k]:.2e}: greedy top-2 too close for a robust fixture; change --seed")
    save_file(tensors, str(args.out / "recorded.safetensors"))

    meta.update(
        vocab_size=VOCAB,
        image_vocab_size=IMAGE_VOCAB,
        mm_vocab_size=MM_VOCAB,
        image_code_offset=VOCAB,
        som_id=SOM,
        eom_id=EOM,
        image_id=IMG,
        digit0_id=DIGIT0,
        space_id=SPACE,
        pad_id=PAD,
        image_hw=[H, W],
        cfg_scale=CFG_SCALE,
        sample_seed=SAMPLE_SEED,
        sample_settings={"temperature": 1.0, "min_p": 0.03, "top_p": 1.0, "num_return_sequences": 2},
        seed=args.seed,
        attn_implementation=model.config._attn_implementation,
        vision_modules="real (flash_attn stubbed)" if args.real_vision else "stand-ins",
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
        },
        released_commit=args.released_commit or git_commit(args.released),
        command=" ".join(["python", "scripts/make_xomni_fixture.py", *sys.argv[1:]]),
        state_dict_keys=sorted(model.state_dict()),
    )
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    sizes = {f: os.path.getsize(args.out / f) for f in sorted(os.listdir(args.out))}
    print(
        json.dumps(
            {
                "out": str(args.out),
                "bytes": sizes,
                **{k: meta[k] for k in ("gen_greedy_min_margin", "gen_cfg_min_margin")},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
