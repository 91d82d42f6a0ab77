"""Build tests/fixtures/xomni_vision_tiny with the *released* X-Omni vision code: tiny random SigLIP-VQ tokenizer and
FLUX decoder parts and their recorded outputs, to check gvu/models/xomni/vision.py and decoder.py against.

Run it in the released code's environment (the venv of scripts/make_xomni_fixture.py) with timm and diffusers:

    /work/venv-xomni/bin/pip install --no-deps timm==1.0.15 diffusers==0.33.1
    /work/venv-xomni/bin/python scripts/make_xomni_vision_fixture.py --released /tmp/xomni_released \\
        --out tests/fixtures/xomni_vision_tiny

The released modeling_vit.py, modeling_siglip_tokenizer.py and modeling_siglip_flux.py are imported unedited. Two
imports are stood in for: `flash_attn` (not buildable here; the stand-in computes softmax(q k^T * scale) v with
torch's SDPA, the same maths, layout (B, N, heads, C)) and `torchvision` (the PyPI builds are CUDA builds that fail
against the CPU torch; the released code uses only transforms.Compose / ToTensor / Normalize / Lambda, and timm
imports ops.misc.FrozenBatchNorm2d, which the ViT never builds). Their stand-ins are written out below.

Written: vit.pt and projector.pt (state dicts, as the released torch.load files), decoder/ (the SigLIP FLUX
transformer), flux/ (a FLUX pipeline folder: VAE, CLIP, T5, scheduler, a plain transformer placeholder),
recorded.safetensors and meta.json (settings, versions).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import platform
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PKG = "xomni_released"
Z, CODES, DIM = 32, 32, 16  # z_channels, codebook size, codebook dim
TRANSFORM = dict(short_size=64, long_size=256, patch_size=16, min_short_size=16, max_aspect_ratio=3.0)
WORDS = "a an photo of red blue green yellow dog dogs cat cats car cup two three four and left right above below the"
PROMPT = "a photo of a red dog"


def stand_ins():
    flash = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, softmax_scale=None, **_):  # (B, N, H, C) in and out
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
        return o.transpose(1, 2)

    flash.flash_attn_func = flash_attn_func
    flash.flash_attn_varlen_func = None  # only with cu_slens (a list of images), which the fixture never passes
    sys.modules["flash_attn"] = flash

    class Compose:
        def __init__(self, fs):
            self.fs = fs

        def __call__(self, x):
            for f in self.fs:
                x = f(x)
            return x

    class ToTensor:  # PIL RGB -> float (3, H, W) in [0, 1]
        def __call__(self, pil):
            return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255

    class Normalize:
        def __init__(self, mean, std):
            self.m, self.s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

        def __call__(self, x):
            return (x - self.m) / self.s

    class Lambda:
        def __init__(self, f):
            self.f = f

        def __call__(self, x):
            return self.f(x)

    class AnyAttr(type):  # class attributes too (timm maps InterpolationMode.NEAREST etc. at import)
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return AnyAttr(name, (), {})

    class Placeholder(types.ModuleType):
        """Any other torchvision name (timm's model zoo imports datasets, ops, ...): a class never instantiated."""

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return AnyAttr(name, (), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = Placeholder(spec.name)
            m.__path__ = []
            if spec.name == "torchvision":  # `from torchvision import transforms` reads the attribute first
                tr = Placeholder("torchvision.transforms")
                tr.__path__ = []
                tr.Compose, tr.ToTensor, tr.Normalize, tr.Lambda = Compose, ToTensor, Normalize, Lambda
                m.transforms = sys.modules["torchvision.transforms"] = tr
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def load_released(folder: Path):
    spec = importlib.util.spec_from_file_location(PKG, folder / "__init__.py", submodule_search_locations=[str(folder)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PKG] = pkg
    spec.loader.exec_module(pkg)
    return {
        m: importlib.import_module(f"{PKG}.{m}")
        for m in ("modeling_vit", "modeling_siglip_tokenizer", "modeling_siglip_flux")
    }


def randomise(module, std=0.5):
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)


def word_tokenizer(max_len):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS.split()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_len,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--released", required=True, type=Path, help="copy of omni_r1/models")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--released-commit", default="unknown")
    args = ap.parse_args()
    import diffusers.pipelines.flux.pipeline_flux  # noqa: F401  (before the stand-ins: both probe for torchvision)
    import transformers  # noqa: F401

    stand_ins()
    mods = load_released(args.released)
    vitm, tokm, fluxm = mods["modeling_vit"], mods["modeling_siglip_tokenizer"], mods["modeling_siglip_flux"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rec = {}

    # ---- SigLIP-VQ tokenizer: the released classes, tiny sizes (a 16 x 16 position grid = img_size 256)
    vit = vitm.VisionTransformer(
        img_size=256,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        class_token=False,
        global_pool="map",
        dynamic_img_pad=False,
        strict_img_size=False,
        weight_init="skip",
        num_classes=0,
    ).eval()
    proj = tokm.VQConvProjector(z_channels=Z, codebook_size=CODES, codebook_dim=DIM).eval()
    randomise(vit)
    randomise(proj)
    torch.save(vit.state_dict(), out / "vit.pt")
    torch.save(proj.state_dict(), out / "projector.pt")
    tok = tokm.SiglipTokenizer.__new__(tokm.SiglipTokenizer)
    torch.nn.Module.__init__(tok)
    tok.vit, tok.vqproj = vit, proj
    pre = tokm.create_anyres_preprocess(**TRANSFORM)
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, (h, w) in {"square": (64, 64), "wide": (48, 80), "small": (24, 40)}.items():
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x = pre(Image.fromarray(img))
        with torch.no_grad():
            feats, hw, _ = vit(x[None])
            codes = tok.encode(x[None])
        rec.update(
            {
                f"{name}_image": torch.from_numpy(img),
                f"{name}_pre": x,
                f"{name}_feats": feats[0],
                f"{name}_codes": codes[0],
            }
        )
    codes = torch.randint(0, CODES, (1, 4, 4))
    with torch.no_grad():
        rec["codes"], rec["codes_features"] = codes[0], tok.decode(codes.view(-1), (1, 4, 4, DIM))[0]

    # ---- FLUX decoder: the released transformer and pipeline, tiny components
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    flux = dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    transformer = fluxm.FluxTransformer2DModelWithSigLIP(siglip_channels=Z, **flux).eval()
    randomise(transformer, 0.2)
    transformer.save_pretrained(out / "decoder")
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            eos_token_id=3,
            bos_token_id=2,
        )
    ).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8, 8],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=clip,
        tokenizer=word_tokenizer(16),
        text_encoder_2=t5,
        tokenizer_2=word_tokenizer(16),
    )
    from diffusers import FluxPipeline

    FluxPipeline(**parts, transformer=FluxTransformer2DModel(**flux)).save_pretrained(out / "flux")
    pipe = fluxm.FluxPipelineWithSigLIP(**parts, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        siglip = tok.decode(codes.view(-1), (1, 4, 4, DIM))
        siglip = siglip.reshape(*siglip.shape[:2], -1).transpose(1, 2).contiguous()  # as the released detokenize
        for key, text in (("decoded_prompt", PROMPT), ("decoded_empty", "")):
            img = pipe(
                siglip,
                [text],
                negative_prompt=[""],
                height=64,
                width=64,
                num_inference_steps=2,
                guidance_scale=1.0,
                true_cfg_scale=2.0,
                true_cfg_scale_2=2.0,
                max_sequence_length=16,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images[0]
            rec[key] = torch.from_numpy((img * 255).round().astype(np.uint8))
        grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).view(16, 2)
        t_in = dict(
            hidden_states=torch.randn(1, 16, 16),
            encoder_hidden_states=torch.randn(1, 5, 16),
            pooled_projections=torch.randn(1, 16),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([1.0]),
            img_ids=torch.cat([torch.zeros(16, 1), grid], 1),
            txt_ids=torch.zeros(5, 3),
            siglip_tensor=siglip,
        )
        rec.update({f"t_{k}": v for k, v in t_in.items()})
        rec["t_out"] = transformer(**t_in, return_dict=False)[0]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in rec.items()}, out / "recorded.safetensors")
    import diffusers
    import timm

    meta = {
        "transform": TRANSFORM,
        "z_channels": Z,
        "codebook_size": CODES,
        "codebook_dim": DIM,
        "prompt": PROMPT,
        "vit": dict(width=32, layers=2, heads=2, mlp_ratio=2.0, grid=16),
        "flux": flux,
        "decode": dict(height=64, width=64, steps=2, true_cfg=2.0, guidance=1.0, seed=0, max_text_len=16),
        "released_commit": args.released_commit,
        "command": " ".join(sys.argv),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
            "timm": timm.__version__,
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {out}: {sorted(rec)}")


if __name__ == "__main__":
    main()
