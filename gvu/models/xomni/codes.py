"""A lossless picture of image codes: what the X-Omni backend's `decode` returns on the token reward path.

X-Omni's own pixels come from a FLUX-based diffusion decoder that this repository has not ported (docs/xomni.md).
Without it, `decode` draws each code as a PATCH x PATCH block of one colour, colour(k) = (A k + B) mod 2^24 as
RGB bytes: an injective map (A is odd), so equal codes share a colour in sample grids, and `read_codes` recovers
the codes bit for bit. The token reward reads the codes back this way, exactly, and refuses any other picture: it
never interprets pixels. The colours mean nothing visually; they are not a decoder.
"""

from __future__ import annotations

import numpy as np
import torch

PATCH = 16  # pixels per code side, X-Omni's (one code per 16 x 16 px: 36 x 36 codes for 576 px)
_A, _B, _MOD = 0x9E3779, 0x3C6EF3, 1 << 24  # an odd multiplier spreads consecutive codes over the colour cube
_A_INV = pow(_A, -1, _MOD)


def render_codes(codes: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """int64 (N, H*W) codes in raster order -> uint8 (N, H*PATCH, W*PATCH, 3), one coloured block per code."""
    H, W = hw
    c = torch.as_tensor(codes).cpu().numpy().astype(np.int64).reshape(-1, H, W)
    v = (c * _A + _B) % _MOD
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], -1).astype(np.uint8)  # (N, H, W, 3)
    return np.ascontiguousarray(rgb.repeat(PATCH, 1).repeat(PATCH, 2))


def read_codes(images, hw: tuple[int, int], num_codes: int) -> torch.Tensor:
    """uint8 (N, H*PATCH, W*PATCH, 3) from `render_codes` -> int64 (N, H*W); ValueError for any other picture."""
    H, W = hw
    x = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (H * PATCH, W * PATCH, 3):
        raise ValueError(
            f"the token reward path reads images of decode's code rendering, uint8 (N, {H * PATCH}, {W * PATCH}, 3); "
            f"got {x.dtype} {x.shape}"
        )
    blocks = x.reshape(x.shape[0], H, PATCH, W, PATCH, 3)
    corner = blocks[:, :, :1, :, :1]
    v = (corner[..., 0].astype(np.int64) << 16) | (corner[..., 1].astype(np.int64) << 8) | corner[..., 2]
    codes = ((v[:, :, 0, :, 0] - _B) * _A_INV) % _MOD
    if not (blocks == corner).all() or codes.max(initial=0) >= num_codes:
        raise ValueError(
            "these images are not decode's code rendering (blocks not uniform, or colours that are no code): the "
            "token reward path scores the generated codes and cannot read other pixels (docs/xomni.md)"
        )
    return torch.from_numpy(codes.reshape(x.shape[0], H * W))


class TokenCodec:
    """reward_path 'tokens': decode renders the codes (losslessly), encode reads them back. No pixels are modelled."""

    def __init__(self, hw: tuple[int, int], num_codes: int):
        self.hw, self.num_codes = hw, num_codes

    def decode(self, codes: torch.Tensor, texts=None) -> np.ndarray:
        """int64 (N, H*W) -> uint8 (N, 16H, 16W, 3); texts are ignored (nothing is generated)."""
        return render_codes(codes, self.hw)

    def encode(self, images) -> tuple[torch.Tensor, tuple[int, int]]:
        """decode's renderings -> (codes int64 (N, H*W), (H, W))."""
        return read_codes(images, self.hw, self.num_codes), self.hw
