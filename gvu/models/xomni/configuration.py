"""XOmniConfig: the released X-Omni config (a Qwen2 config plus the image adapter / head fields), for transformers 5.

Loads a released `config.json` (model_type "x-omni") unchanged; unknown released keys (e.g. `auto_map`) are kept
as attributes, as transformers does for any config.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config


@strict
class XOmniConfig(Qwen2Config):
    r"""Qwen2 backbone whose first num_mm_adap_layers and last num_mm_head_layers layers update image positions only.

    Ids `>= vocab_size` are multimodal (`mm_embed_tokens`, `mm_norm`); image code k is id `vocab_size + k` for
    k < `image_vocab_size`; the rest of the `mm_vocab_size` ids hold the mm special tokens.
    """

    model_type = "x-omni"

    num_mm_adap_layers: int = 4
    num_mm_head_layers: int = 4
    mm_vocab_size: int = 16448
    image_vocab_size: int = 16384
    mm_special_tokens: list[str] | tuple[str, ...] = ("<SOM>", "<EOM>", "<IMAGE>")
    # The released checkpoint's SigLIP-VQ tokenizer / FLUX decoder settings (read by its `init_vision`, kept as is).
    vision_config: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        a, h = self.num_mm_adap_layers, self.num_mm_head_layers
        if min(a, h) < 0 or a + h > self.num_hidden_layers:
            raise ValueError(
                f"num_mm_adap_layers={a} and num_mm_head_layers={h} must be >= 0 with a sum <= "
                f"num_hidden_layers={self.num_hidden_layers}: lower them or add layers"
            )
        if not 0 < self.image_vocab_size <= self.mm_vocab_size:
            raise ValueError(
                f"image_vocab_size={self.image_vocab_size} must be in (0, mm_vocab_size={self.mm_vocab_size}]"
            )

    def is_lm_layer(self, layer_idx: int) -> bool:
        """True for the shared layers that update every position; False for the image-only adapter / head layers."""
        return self.num_mm_adap_layers <= layer_idx < self.num_hidden_layers - self.num_mm_head_layers


__all__ = ["XOmniConfig"]
