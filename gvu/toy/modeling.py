"""The toy UMM's parts: its closed vocabulary and tokenizer, its tiny Llama config, and the factorised
parametrisation of the output head's image-code rows (the toy's `lora.image_head` update and `--head factorised`)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from gvu.toy import world as W

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<boi>", "<eoi>", "<eor>", "<describe>")
WORDS = tuple(
    dict.fromkeys(
        ["a", "an", "photo", "of", "and", "left", "right", "above", "below", "two", "three", "four"]
        + list(W.SIZES)
        + list(W.COLORS)
        + list(W.SHAPES)
        + [W.PLURALS[s] for s in W.SHAPES]
    )
)


def build_tokenizer() -> Tokenizer:
    """WordLevel tokenizer over specials + words + one token per image code (<c0>..<c120>)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + tuple(f"<c{k}>" for k in range(W.NUM_CODES)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def default_config(vocab_size: int, **overrides):
    """A tiny Llama: d=96, 3 layers, 4 heads, FFN 384 (the prototype's size, ~0.45M parameters)."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=SPECIALS.index("<bos>"),
        eos_token_id=SPECIALS.index("<eos>"),
    )
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


class FactorisedCodeRows(torch.nn.Module):
    """Parametrisation of lm_head.weight (V, D): the image-code rows become sums of attribute rows.

    row(empty) = E; row(code of shape s, colour c, size z) = S[s] + C[c] + Z[z]. `attributes` is the fixed
    one-hot matrix (K, 1 + shapes + colours + sizes) and `table` the learned attribute rows; the other rows of
    the weight (words, specials) stay free. Removing the parametrisation leaves an ordinary (V, D) weight.
    With `residual`, the sums are added to the weight's own code rows instead (a factorised update of a
    trained head; init 0 starts at the head itself). `enabled = False` gives the weight back unchanged (the
    reference policy of a trained residual update; see gvu.models.adapter_disabled).
    """

    def __init__(self, offset: int, hidden: int, init: float = 0.02, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.enabled = True
        self.policy_update = residual  # a residual update is part of the trained policy (off in the reference)
        n_s, n_c, n_z = len(W.SHAPES), len(W.COLORS), len(W.SIZES)
        a = torch.zeros(W.NUM_CODES, 1 + n_s + n_c + n_z)
        a[0, 0] = 1.0
        for k in range(1, W.NUM_CODES):
            s, c, z = W.attrs_of(k)
            a[k, 1 + s] = a[k, 1 + n_s + c] = a[k, 1 + n_s + n_c + z] = 1.0
        self.register_buffer("attributes", a)
        self.table = torch.nn.Parameter(torch.randn(a.shape[1], hidden) * init)
        self.offset = offset

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        end = self.offset + W.NUM_CODES
        rows = self.attributes @ self.table
        if self.residual:
            rows = weight[self.offset : end] + rows
        return torch.cat([weight[: self.offset], rows, weight[end:]])
