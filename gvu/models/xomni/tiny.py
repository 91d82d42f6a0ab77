"""Tiny random X-Omni vision parts for CPU tests (no download): a SigLIP-VQ tokenizer and a FLUX decoder pipeline
(CLIP, T5, VAE, scheduler, transformer) small enough to run in a second, written as a released X-Omni folder lays
them out (vision_config in config.json, torch.load weight files, the decoder's transformer in a subfolder)."""

from __future__ import annotations

import json
import os

import torch

TINY_VIT = dict(width=32, layers=2, heads=2, mlp_ratio=2.0, grid=16)  # "gvu_vit": overrides the siglip_name table
WORDS = "a an photo of red blue green yellow dog dogs cat cats car cup two three four and left right above below the"


def vision_config(num_codes: int, image_px: int) -> dict:
    """The released vision_config layout for the tiny parts (decoder: 2 steps, true CFG 2)."""
    return {
        "dtype": "float32",
        "transform": {"short_size": image_px, "long_size": 4 * image_px, "patch_size": 16, "min_short_size": 16},
        "encoder": {
            "siglip_name": "siglip2_giant_patch16_384", "gvu_vit": TINY_VIT, "siglip_path": "vit.pt",
            "projector_path": "projector.pt", "z_channels": 32, "codebook_size": num_codes, "codebook_dim": 16,
        },
        "decoder": {"model_path": "decoder", "upscale_factor": 16, "num_inference_steps": 2, "cfg_scale": 2.0},
    }  # fmt: skip


def _word_tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS.split()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=max_len,
    )  # fmt: skip


def write_tiny_vision(xomni_path: str, flux_path: str, image_px: int = 64, seed: int = 0) -> None:
    """Random SigLIP-VQ weights + decoder transformer into the X-Omni folder (its config.json gains vision_config),
    and a tiny FLUX pipeline folder (CLIP, T5, VAE with 8x downsampling, flow-matching scheduler) at flux_path."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from gvu.models.xomni.decoder import SigLIPFluxTransformer
    from gvu.models.xomni.vision import SigLIPVQ

    cfg_path = os.path.join(xomni_path, "config.json")
    cfg = json.loads(open(cfg_path).read())
    vc = cfg["vision_config"] = vision_config(cfg["image_vocab_size"], image_px)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    torch.manual_seed(seed)
    enc = vc["encoder"]
    vq = SigLIPVQ(TINY_VIT, enc["z_channels"], enc["codebook_size"], enc["codebook_dim"])
    for p in vq.parameters():  # O(1) weights, so that different codes give visibly different features
        torch.nn.init.normal_(p, std=0.5)
    torch.save(vq.vit.state_dict(), os.path.join(xomni_path, enc["siglip_path"]))
    torch.save(vq.vqproj.state_dict(), os.path.join(xomni_path, enc["projector_path"]))
    flux = dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    transformer = SigLIPFluxTransformer(siglip_channels=enc["z_channels"], **flux)
    torch.nn.init.normal_(transformer.siglip_embed.weight, std=0.5)
    transformer.save_pretrained(os.path.join(xomni_path, vc["decoder"]["model_path"]))
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, eos_token_id=3, bos_token_id=2)
    )  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2))
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=2, layers_per_block=1,
        scaling_factor=0.3611, shift_factor=0.1159,  # FLUX.1-dev's VAE
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae, text_encoder=clip,
        tokenizer=_word_tokenizer(16), text_encoder_2=t5, tokenizer_2=_word_tokenizer(16),
        transformer=FluxTransformer2DModel(**flux),  # FLUX.1-dev's own, replaced by X-Omni's at load (as released)
    )  # fmt: skip
    pipe.save_pretrained(flux_path)
