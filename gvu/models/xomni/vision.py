"""X-Omni's SigLIP-VQ image tokenizer in plain torch: pixels -> codes (the reward's path (a)), codes -> the
diffusion decoder's conditioning features. Written from the released modeling_siglip_tokenizer.py / modeling_vit.py
(read for facts; docs/xomni.md), not checked against the released code's outputs (no vision fixture yet).

    encoder   any-resolution resize (PIL bicubic to multiples of 16, short side >= short_size, long <= long_size),
              [-1, 1] -> ViT (patch 16, no class token, a 128 x 128 position grid resized bilinearly to the image's,
              pre-LN blocks, no final norm) -> quant_conv (1x1) -> the cosine-nearest codebook row (IBQ)
    features  codebook rows (raw) -> post_quant_conv (1x1) -> 2 residual blocks (GroupNorm 32, GELU, conv 3x3)
              -> (N, H*W, z_channels), what the FLUX decoder adds to its latent tokens (one code per 16 px)
State-dict key names are the released ones: the ViT file holds patch_embed.proj.*, pos_embed, blocks.{i}.(norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).*; the projector file quant_conv, quantize.embedding, post_quant_conv,
post_conv.{0,1}.(conv1, norm1, conv2, norm2).*.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# the released table (modeling_vit.SigLIP_MODEL_CONFIG): width, layers, heads, mlp ratio; patch 16 for both
SIGLIP = {
    "siglip_so400m_patch16_384": dict(width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip2_giant_patch16_384": dict(width=1536, layers=40, heads=16, mlp_ratio=4.0),
}
TRANSFORM = dict(short_size=384, long_size=1152, patch_size=16, min_short_size=128, max_aspect_ratio=3.0)
POS_GRID = 128  # the released ViT is built for img_size 2048 / patch 16


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale head_dim ** -0.5 (flash_attn_func)
        x = x + self.attn.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class SigLIPViT(nn.Module):
    """(N, 3, 16h, 16w) in [-1, 1] -> features (N, h*w, width), the released VisionTransformer.forward_features."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, patch: int = 16, grid: int = POS_GRID):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width))
        self.blocks = nn.Sequential(*[_Block(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x)
        h, w = x.shape[-2:]
        g = int(self.pos_embed.shape[1] ** 0.5)
        pos = self.pos_embed
        if (h, w) != (g, g):  # the released rescale_positional_embedding
            pos = F.interpolate(pos[0].T.reshape(1, -1, g, g), (h, w), mode="bilinear", align_corners=False)
            pos = pos.reshape(-1, h * w).T[None]
        return self.blocks(x.flatten(2).transpose(1, 2) + pos)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.norm1, self.norm2 = nn.GroupNorm(32, c), nn.GroupNorm(32, c)

    def forward(self, x):
        return x + self.conv2(F.gelu(self.norm2(self.conv1(F.gelu(self.norm1(x))))))


class SigLIPVQ(nn.Module):
    """The SigLIP-VQ tokenizer: `encode` uint8 images -> codes, `features` codes -> the decoder's features."""

    def __init__(self, vit: dict, z_channels=1536, codebook_size=16384, codebook_dim=2048, transform=None):
        super().__init__()
        self.vit = SigLIPViT(**vit)
        self.transform = {**TRANSFORM, **(transform or {})}
        self.vqproj = nn.Module()
        p = self.vqproj
        p.quant_conv, p.post_quant_conv = nn.Conv2d(z_channels, codebook_dim, 1), nn.Conv2d(codebook_dim, z_channels, 1)
        p.quantize = nn.Module()
        p.quantize.embedding = nn.Embedding(codebook_size, codebook_dim)
        p.post_conv = nn.Sequential(_Residual(z_channels), _Residual(z_channels))

    @classmethod
    def from_folder(cls, path: str, vision_config: dict, dtype=torch.float32) -> SigLIPVQ:
        """The tokenizer of a released X-Omni folder (config.json's vision_config, torch.load weight files)."""
        enc = vision_config["encoder"]
        vit = enc.get("gvu_vit") or SIGLIP[enc["siglip_name"]]  # gvu_vit: the tiny test sizes (xomni/tiny.py)
        keys = ("z_channels", "codebook_size", "codebook_dim")
        m = cls(vit, **{k: enc[k] for k in keys if k in enc}, transform=vision_config.get("transform"))
        vit_sd = torch.load(os.path.join(path, enc["siglip_path"]), map_location="cpu", weights_only=True)
        # strict=False as released: the file also holds the attention-pool head, which the tokenizer never runs
        missing = m.vit.load_state_dict(vit_sd, strict=False).missing_keys
        if missing:
            raise ValueError(f"{enc['siglip_path']}: missing ViT weights {missing[:5]}")
        proj_sd = torch.load(os.path.join(path, enc["projector_path"]), map_location="cpu", weights_only=True)
        m.vqproj.load_state_dict(proj_sd, strict=True)
        return m.to(dtype).eval().requires_grad_(False)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> (3, H', W') in [-1, 1]: the released create_anyres_preprocess (random_ratio off)."""
        from PIL import Image

        t = self.transform
        h, w = image.shape[:2]
        ss, ls = min(w, h), max(w, h)
        if ss < t["min_short_size"] or ls / ss > t["max_aspect_ratio"]:
            raise ValueError(f"image {w}x{h}: short side below {t['min_short_size']} or aspect above the limit")
        tw, th = float(w), float(h)
        if min(tw, th) < t["short_size"]:
            tw, th = tw * t["short_size"] / min(w, h), th * t["short_size"] / min(w, h)
        if max(tw, th) > t["long_size"]:
            s = t["long_size"] / max(tw, th)
            tw, th = tw * s, th * s
        p = t["patch_size"]
        tw, th = int(round(tw / p)) * p, int(round(th / p)) * p
        pil = Image.fromarray(image).convert("RGB").resize((tw, th), resample=Image.BICUBIC)  # always, as released
        x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255
        return (x - 0.5) / 0.5

    @torch.no_grad()
    def encode(self, images) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 (N, H, W, 3) of one size -> (codes int64 (N, h*w), (h, w))."""
        imgs = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
        dev, dt = self.vqproj.quant_conv.weight.device, self.vqproj.quant_conv.weight.dtype
        x = torch.stack([self.preprocess(im) for im in imgs]).to(dev, dt)
        f = self.vit(x)
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        z = self.vqproj.quant_conv(f.transpose(1, 2).reshape(f.shape[0], -1, h, w))
        z = F.normalize(z.flatten(2).transpose(1, 2).float(), dim=-1)  # (N, h*w, D)
        e = F.normalize(self.vqproj.quantize.embedding.weight.float(), dim=-1)
        # argmin |z - e|^2 = argmax z.e for unit vectors (the released IBQ with l2_norm in eval mode)
        return (z @ e.T).argmax(-1), (h, w)

    @torch.no_grad()
    def features(self, codes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """int64 (N, h*w) -> (N, h*w, z_channels): the released SiglipTokenizer.decode, flattened for the decoder."""
        (h, w), p = hw, self.vqproj
        z = p.quantize.embedding(codes).view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2)
        z = p.post_conv(p.post_quant_conv(z))
        return z.flatten(2).transpose(1, 2)
