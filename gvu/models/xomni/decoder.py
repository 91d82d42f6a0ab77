"""X-Omni's diffusion decoder on diffusers' FLUX: codes' SigLIP-VQ features -> pixels. Needs diffusers (optional:
import this module only on the pixel path). Written from the released modeling_siglip_flux.py (read for facts).

    transformer  FluxTransformer2DModel + `siglip_embed` (Linear z_channels -> inner dim, no bias), whose output is
                 added to the image tokens after the last double-stream block (one packed latent token per code)
    sampling     the released FluxPipelineWithSigLIP.__call__: flow-matching Euler with FLUX's dynamic shift,
                 guidance embedding 1.0, true CFG in one batch of [conditional; negative] rows, the negative row
                 with the empty prompt and zeroed SigLIP features; VAE decode; uint8 as diffusers' numpy_to_pil
The text condition: `texts` (the prompt, as the released mmdecode passes it) or the empty prompt (texts=None).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config


class SigLIPFluxTransformer(FluxTransformer2DModel):
    """FLUX with X-Omni's SigLIP conditioning; `forward(..., siglip_tensor=(B, L, z_channels))`."""

    @register_to_config
    def __init__(
        self, patch_size: int = 1, in_channels: int = 64, out_channels: int | None = None, num_layers: int = 19,
        num_single_layers: int = 38, attention_head_dim: int = 128, num_attention_heads: int = 24,
        joint_attention_dim: int = 4096, pooled_projection_dim: int = 768, guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56), siglip_channels: int = 1536, drop_token_prob: float = 0.0,
    ):  # fmt: skip
        # the released signature; drop_token_prob (training-time token dropout) is kept for its config and unused
        super().__init__(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )  # fmt: skip
        if not self.transformer_blocks:
            raise ValueError("the SigLIP features enter after the double-stream blocks: num_layers must be >= 1")
        self.siglip_embed = torch.nn.Linear(siglip_channels, self.inner_dim, bias=False)
        self._siglip = None
        # a hook, not a copy of FLUX's forward: the block returns (encoder_hidden_states, hidden_states)
        self.transformer_blocks[-1].register_forward_hook(self._add_siglip)

    def _add_siglip(self, module, args, out):
        if self._siglip is None:
            return out
        enc, hid = out
        return enc, hid + self.siglip_embed(self._siglip.to(hid.dtype))

    def forward(self, *args, siglip_tensor: torch.Tensor | None = None, **kwargs):
        self._siglip = siglip_tensor
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._siglip = None


class XOmniDecoder:
    """Features (N, h*w, z_channels) -> uint8 (N, h*up, w*up, 3) through a FluxPipeline's components."""

    def __init__(self, pipe, *, upscale_factor: int = 16, num_inference_steps: int = 28, cfg_scale: float = 1.0):
        self.pipe, self.upscale, self.steps, self.cfg_scale = pipe, upscale_factor, num_inference_steps, cfg_scale

    @classmethod
    def from_folders(cls, xomni_path: str, flux_path: str, vision_config: dict, dtype=torch.bfloat16):
        """FLUX.1-dev's pipeline (VAE, CLIP, T5, scheduler) from `flux_path`, X-Omni's transformer from
        `xomni_path`/vision_config.decoder.model_path (as the released init_vision)."""
        from diffusers import FluxPipeline

        dec = vision_config["decoder"]
        transformer = SigLIPFluxTransformer.from_pretrained(
            xomni_path, subfolder=dec["model_path"], dtype=dtype,
            siglip_channels=vision_config["encoder"].get("z_channels", 1536),
        )  # fmt: skip
        pipe = FluxPipeline.from_pretrained(flux_path, transformer=transformer, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        kw = {k: dec[k] for k in ("upscale_factor", "num_inference_steps", "cfg_scale") if k in dec}
        return cls(pipe, **kw)

    def to(self, device):
        self.pipe.to(device)
        return self

    @torch.no_grad()
    def decode(self, features: torch.Tensor, hw: tuple[int, int], texts=None, generator=None, max_text_len=512):
        """(N, h*w, C) features -> uint8 (N, h*up, w*up, 3); texts: N prompts for the text condition, or None for
        the empty prompt (no prompt text reaches the pixels)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        pipe, n = self.pipe, features.shape[0]
        dev, dt = pipe.transformer.device, pipe.transformer.dtype
        H, W = hw[0] * self.upscale, hw[1] * self.upscale
        emb, pooled, text_ids = pipe.encode_prompt(
            list(texts) if texts else [""] * n, device=dev, max_sequence_length=max_text_len
        )
        neg, neg_pooled, _ = pipe.encode_prompt([""], device=dev, max_sequence_length=max_text_len)
        if emb.shape[1] != neg.shape[1]:
            raise ValueError("prompt and negative embeddings differ in length: use a fixed max_text_len")
        latents, img_ids = pipe.prepare_latents(n, pipe.transformer.config.in_channels // 4, H, W, dt, dev, generator)
        if latents.shape[1] != features.shape[1]:
            raise ValueError(f"{latents.shape[1]} latent tokens for {features.shape[1]} codes: check upscale_factor")
        sc = pipe.scheduler.config
        mu = calculate_shift(
            latents.shape[1], sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
            sc.get("base_shift", 0.5), sc.get("max_shift", 1.15),
        )  # fmt: skip
        sigmas = np.linspace(1.0, 1 / self.steps, self.steps)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, self.steps, dev, sigmas=sigmas, mu=mu)
        guidance = torch.full((2 * n,), 1.0, device=dev) if pipe.transformer.config.guidance_embeds else None
        enc = torch.cat([emb, neg.expand_as(emb)]).to(dt)
        pool = torch.cat([pooled, neg_pooled.expand_as(pooled)]).to(dt)
        siglip = torch.cat([features, torch.zeros_like(features)]).to(dev, dt)
        for t in timesteps:
            pred = pipe.transformer(
                hidden_states=torch.cat([latents, latents]), timestep=t.expand(2 * n).to(dt) / 1000,
                guidance=guidance, pooled_projections=pool, encoder_hidden_states=enc, txt_ids=text_ids,
                img_ids=img_ids, siglip_tensor=siglip, return_dict=False,
            )[0]  # fmt: skip
            cond, uncond = pred.chunk(2)
            latents = pipe.scheduler.step(uncond + self.cfg_scale * (cond - uncond), t, latents, return_dict=False)[0]
        lat = pipe._unpack_latents(latents, H, W, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        img = pipe.image_processor.postprocess(pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0], "np")
        return (img * 255).round().astype(np.uint8)


class PixelCodec:
    """reward_path 'pixels' (the paper's): decode = SigLIP-VQ features -> FLUX decoder -> pixels, encode = the
    SigLIP-VQ tokenizer on those pixels. Each row's decoder noise comes from its own generator seeded `seed`, so a
    row decodes the same alone or in a batch (up to float reduction order)."""

    def __init__(self, vq, decoder: XOmniDecoder, hw: tuple[int, int], seed: int = 0):
        self.vq, self.decoder, self.hw, self.seed = vq, decoder, hw, seed

    @classmethod
    def from_folder(cls, path: str, flux_path: str, hw: tuple[int, int], seed: int = 0, dtype=torch.float32):
        import json
        import os

        from gvu.models.xomni.vision import SigLIPVQ

        vc = json.loads(open(os.path.join(path, "config.json")).read())["vision_config"]
        vq = SigLIPVQ.from_folder(path, vc, dtype)
        return cls(vq, XOmniDecoder.from_folders(path, flux_path, vc, dtype), hw, seed)

    def decode(self, codes: torch.Tensor, texts=None) -> np.ndarray:
        """int64 (N, H*W) -> uint8 (N, 16H, 16W, 3); texts: N prompts to condition the decoder on (the released
        mmdecode), or None: the empty prompt, so no prompt text reaches the pixels except through the codes."""
        dev = codes.device
        self.vq.to(dev)
        self.decoder.to(dev)
        gens = [torch.Generator(dev).manual_seed(self.seed) for _ in range(codes.shape[0])]
        return self.decoder.decode(self.vq.features(codes, self.hw), self.hw, texts, gens)

    def encode(self, images) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 (N, H, W, 3) -> (codes int64 (N, h*w), (h, w)) through the SigLIP-VQ tokenizer."""
        return self.vq.encode(images)
