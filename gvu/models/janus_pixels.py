"""Janus-Pro's pixels: VQ codes <-> uint8 images (the frozen VQ model), and uint8 images -> SigLIP inputs as
JanusImageProcessor makes them (resize, pad, rescale, normalise), batched in torch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Janus-Pro's JanusImageProcessor settings (preprocessor_config.json overrides them when present)
IMAGE_PROCESSING = {"size": 384, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255}


class JanusPixels:
    """The VQ model (frozen, private) and the image processor's settings."""

    def __init__(self, vq: torch.nn.Module, image_processing: dict | None = None):
        self.vq = vq.eval().requires_grad_(False)
        ip = {**IMAGE_PROCESSING, **(image_processing or {})}
        size = ip["size"]
        self.image_size = int(size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size)
        self.mean, self.std = torch.tensor(ip["image_mean"]), torch.tensor(ip["image_std"])
        self.rescale = float(ip["rescale_factor"])
        self.background = [int(m * 255) for m in ip["image_mean"]]  # JanusImageProcessor's pad colour
        self.settings = ip

    @torch.no_grad()
    def decode(self, image_tokens: torch.Tensor, rows: int) -> np.ndarray:
        """Codes (N, L) -> uint8 pixels (N, H, W, 3) through the VQ decoder (HF postprocess: truncating cast)."""
        tokens = torch.as_tensor(image_tokens).long()
        self.vq.to(tokens.device)
        out = []
        for s in range(0, tokens.shape[0], rows):
            x = self.vq.decode(tokens[s : s + rows]).float()  # (n, 3, H, W) in [-1, 1]
            x = (x * self.std.to(x.device)[:, None, None] + self.mean.to(x.device)[:, None, None]) * 255
            out.append(x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def encode(self, pixels) -> torch.Tensor:
        """uint8 pixels (N, H, W, 3) at the VQ resolution -> codes int64 (N, L) (the VQ encoder; not exact)."""
        p = torch.as_tensor(np.asarray(pixels) if not torch.is_tensor(pixels) else pixels)
        dev = next(self.vq.parameters()).device
        x = p.to(dev).permute(0, 3, 1, 2).float() * self.rescale
        x = (x - self.mean.to(dev)[:, None, None]) / self.std.to(dev)[:, None, None]
        out = self.vq.encode(x.to(next(self.vq.parameters()).dtype))
        return out.image_tokens.view(p.shape[0], -1)

    def pixel_values(self, images, device, dtype) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> SigLIP input (N, 3, S, S): JanusImageProcessor's resize (longest side to S,
        bicubic, antialiased), pad to square with the mean colour, rescale, normalise; batched in torch."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).to(device)
        x = x.permute(0, 3, 1, 2).float()
        S = self.image_size
        h, w = x.shape[-2:]
        if max(h, w) != S:
            d = S / max(h, w)
            x = F.interpolate(x, size=(max(round(h * d), 14), max(round(w * d), 14)), mode="bicubic", antialias=True)
            x = x.round().clamp(0, 255)  # the processor resizes uint8 images and stays uint8
            h, w = x.shape[-2:]
        if h != w:
            m = max(h, w)
            sq = torch.tensor(self.background, dtype=x.dtype, device=device)[None, :, None, None].expand(-1, -1, m, m)
            sq = sq.repeat(x.shape[0], 1, 1, 1)
            top, left = (m - h) // 2, (m - w) // 2
            sq[:, :, top : top + h, left : left + w] = x
            x = sq
        x = x * self.rescale
        x = (x - self.mean.to(device)[:, None, None]) / self.std.to(device)[:, None, None]
        return x.to(dtype)
