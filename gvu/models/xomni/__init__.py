"""X-Omni (Qwen2.5-7B + image adapter / head layers) ported to the pinned transformers; see docs/xomni.md.

    modeling, configuration   the language model (this package's exports)
    backend                   XOmniUMM, the trainer's backend (`model.backend: xomni`); options: its folder options
    codes                     the token reward path's lossless code rendering
    vision, decoder           the SigLIP-VQ tokenizer, the FLUX decoder (the pixel reward path; decoder: diffusers)
    tiny                      tiny vision parts for CPU tests

Importing this package registers model_type "x-omni" with AutoConfig and AutoModelForCausalLM, so a released
X-Omni folder loads with `XOmniForCausalLM.from_pretrained(path)` or the Auto classes, without trust_remote_code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from gvu.models.xomni.configuration import XOmniConfig
from gvu.models.xomni.modeling import XOmniForCausalLM, XOmniModel, position_ids_from_mask

AutoConfig.register(XOmniConfig.model_type, XOmniConfig, exist_ok=True)
AutoModelForCausalLM.register(XOmniConfig, XOmniForCausalLM, exist_ok=True)

__all__ = ["XOmniConfig", "XOmniForCausalLM", "XOmniModel", "position_ids_from_mask"]
