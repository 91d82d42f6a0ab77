"""X-Omni's language model on transformers 5's Qwen2 classes; loads a released X-Omni folder with its key names.

Layout (B batch, L positions, C hidden, V = vocab_size, M = mm_vocab_size, K = image_vocab_size <= M):
    ids < V          text: `model.lm_embed_tokens`, `model.lm_norm`, `lm_head`
    ids >= V         multimodal: `model.mm_embed_tokens[id - V]`, `model.mm_norm`; image code k is id V + k (k < K)
    layers           Qwen2 decoder layers; outside [num_mm_adap_layers, num_hidden_layers - num_mm_head_layers)
                     a layer's output replaces its input at multimodal positions only (text positions pass through)
    logits (B, L, V + M), fp32, all at finfo(hidden dtype).min except the active mode's part:
                     'text' -> [:V] = lm_head(h);  'image' -> [V:V+K] = mm_head(h)[:K]
The released code carried the multimodal mask as C extra channels of the hidden states through every layer; here
it is a separate (B, L, 1) bool tensor, so transformers 5's layers (which return a tensor, not a tuple) run unwrapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from gvu.models.xomni.configuration import XOmniConfig

GENERATION_MODES = ("text", "image")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L) positions counted from each row's first attended token (pads get 0), as `generate`
    builds them; pass them to `forward` so a left-padded row scores as it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class XOmniDecoderLayer(Qwen2DecoderLayer):
    """A Qwen2 layer; an adapter / head layer (`not is_lm_layer`) keeps its input at text positions."""

    def __init__(self, config: XOmniConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_lm_layer = config.is_lm_layer(layer_idx)

    def forward(self, hidden_states: torch.Tensor, mm_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """hidden_states (B, L, C), mm_mask (B, L, 1) bool -> (B, L, C)."""
        out = super().forward(hidden_states, **kwargs)
        return out if self.is_lm_layer else torch.where(mm_mask, out, hidden_states)


class XOmniPreTrainedModel(Qwen2PreTrainedModel):
    config: XOmniConfig
    config_class = XOmniConfig
    base_model_prefix = "model"
    _no_split_modules = ["XOmniDecoderLayer"]
    _can_record_outputs = {"hidden_states": XOmniDecoderLayer, "attentions": Qwen2Attention}


class XOmniModel(XOmniPreTrainedModel):
    """The decoder body: embeddings, layers and the two final norms; `last_hidden_state` (B, L, C)."""

    def __init__(self, config: XOmniConfig):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        # padding_idx=-1 as released: the last row of each table gets no gradient.
        self.lm_embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=-1)
        self.mm_embed_tokens = nn.Embedding(config.mm_vocab_size, config.hidden_size, padding_idx=-1)
        self.layers = nn.ModuleList([XOmniDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.lm_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mm_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm_embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.lm_embed_tokens = value

    def embed(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> (embeddings (B, L, C), multimodal mask (B, L) bool: id >= vocab_size)."""
        mm = input_ids >= self.vocab_size
        text = self.lm_embed_tokens(input_ids.clamp(max=self.vocab_size - 1))
        multi = self.mm_embed_tokens((input_ids - self.vocab_size).clamp(min=0))
        return torch.where(mm[..., None], multi, text), mm

    def norm(self, hidden_states: torch.Tensor, mm_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, C), (B, L, 1) bool -> mm_norm at multimodal positions, lm_norm elsewhere."""
        return torch.where(mm_mask, self.mm_norm(hidden_states), self.lm_norm(hidden_states))

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        multimodal_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids (B, L), or inputs_embeds (B, L, C) with multimodal_mask (B, L) bool (True: an id >= vocab_size,
        whose position takes mm_norm and the adapter / head layers)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds, multimodal_mask = self.embed(input_ids)
        elif multimodal_mask is None or multimodal_mask.shape != inputs_embeds.shape[:2]:
            raise ValueError(
                "inputs_embeds (B, L, C) needs multimodal_mask (B, L) bool (True at image / mm positions); "
                "`model.model.embed(input_ids)` returns both"
            )
        mm_mask = multimodal_mask.to(torch.bool)[..., None]

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]

        if not isinstance(masks := attention_mask, dict):  # generate may pass them ready-made
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "past_key_values": past_key_values,
                "position_ids": position_ids,
            }
            masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = layer(
                hidden_states,
                mm_mask,
                attention_mask=masks[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states, mm_mask),
            past_key_values=past_key_values if use_cache else None,
        )


class XOmniForCausalLM(XOmniPreTrainedModel, GenerationMixin):
    """X-Omni's LM with `lm_head` (text) and `mm_head` (image codes); `set_generation_mode` picks the active one."""

    _tied_weights_keys = {"lm_head.weight": "model.lm_embed_tokens.weight"}  # only if config.tie_word_embeddings

    def __init__(self, config: XOmniConfig):
        super().__init__(config)
        self.model = XOmniModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mm_head = nn.Linear(config.hidden_size, config.mm_vocab_size, bias=False)
        self.generation_mode = "text"
        self.post_init()

    def set_generation_mode(self, mode: str):
        """'text': logits over the text vocabulary; 'image': over the image codes (as the released model)."""
        if mode not in GENERATION_MODES:
            raise ValueError(f"generation mode {mode!r}: use one of {GENERATION_MODES}")
        self.generation_mode = mode

    def get_decoder(self) -> XOmniModel:
        return self.model

    # What a trainer backend needs without going through the full-width logits.
    @property
    def image_token_offset(self) -> int:
        """Token id of image code 0 (= vocab_size): code k is id image_token_offset + k."""
        return self.config.vocab_size

    @property
    def image_head_weight(self) -> torch.Tensor:
        """(K, C) view of mm_head.weight: the rows that score the K image codes (mm special tokens excluded)."""
        return self.mm_head.weight[: self.config.image_vocab_size]

    def image_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., C) body output -> (..., K) image-code logits, in the hidden dtype (the image-mode active part)."""
        return F.linear(hidden_states, self.image_head_weight)

    def embed_image_codes(self, codes: torch.LongTensor) -> torch.Tensor:
        """(...) image codes in [0, K) -> (..., C) input embeddings (rows of mm_embed_tokens)."""
        return self.model.mm_embed_tokens(codes)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        multimodal_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """-> logits (B, L', V + M) fp32 for the last `logits_to_keep` positions (0: all); see the module docstring."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            multimodal_mask=multimodal_mask,
            **kwargs,
        )
        h = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)
        v, k = self.config.vocab_size, self.config.image_vocab_size
        # Filled in the hidden dtype, then upcast, as released: in bf16 the inactive part is bf16's min as fp32.
        logits = h.new_full((*h.shape[:-1], v + self.config.mm_vocab_size), torch.finfo(h.dtype).min)
        if self.generation_mode == "text":
            logits[..., :v] = self.lm_head(h)
        else:
            logits[..., v : v + k] = self.image_logits(h)
        logits = logits.float()

        loss = None
        if labels is not None:  # over the full width (the released loss reshaped to vocab_size and could not run)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, multimodal_mask=None, **kwargs
    ):
        """As GenerationMixin's; `multimodal_mask` goes with `inputs_embeds` (the prefill) only, later steps are ids."""
        inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        if inputs.get("inputs_embeds") is not None:
            inputs["multimodal_mask"] = multimodal_mask
        return inputs


__all__ = ["XOmniForCausalLM", "XOmniModel", "XOmniPreTrainedModel", "position_ids_from_mask"]
