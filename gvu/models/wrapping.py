"""How the trainer wraps a backend's model: DeepSpeed engine > peft model > transformers model, with ZeRO-3
gathers, the adapter switched off for the reference, the understanding's own adapter (`lora.scope: split`), and
trained updates outside peft's LoRA ("policy updates")."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """DeepSpeed engine / PeftModel / HF model -> the innermost transformers *ForCausalLM-like module.

    LoRA layers stay injected in it, so calling it runs the policy (or the reference inside
    `disable_adapter()`).
    """
    m = model
    while True:
        if hasattr(m, "module") and isinstance(m.module, nn.Module) and type(m).__name__ == "DeepSpeedEngine":
            m = m.module
        elif hasattr(m, "get_base_model") and hasattr(m, "peft_config"):
            m = m.get_base_model()
        else:
            return m


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body returning `last_hidden_state`, lm_head Linear) of a causal LM, through any wrappers."""
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    return body, head


def partitioned(params) -> bool:
    """Whether any of `params` is partitioned by ZeRO-3 (DeepSpeed marks such a parameter with `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in params)


@contextlib.contextmanager
def gathered(*params: torch.Tensor):
    """Full parameters for reading outside their module's forward (needed under ZeRO-3; a no-op otherwise)."""
    if partitioned(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def saveable(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` (a parameter or a view of one), safe to keep for backward after its `gathered` block.

    ZeRO-3 frees a gathered parameter's storage when the block exits, so autograd would find an empty tensor;
    a frozen parameter is copied instead (a trainable one under ZeRO-3 would need its gradient routed back).
    """
    if t is None:
        return None
    base = t if t._base is None else t._base
    if not hasattr(base, "ds_id"):
        return t
    if t.requires_grad:
        raise NotImplementedError(
            "a trainable output head under ZeRO-3 is not supported: keep the head frozen (LoRA on the body) or use "
            "configs/ds_zero2.json"
        )
    return t.detach().clone()


def policy_updates(model: nn.Module) -> dict[str, nn.Module]:
    """Trained updates outside peft's LoRA (modules flagged `policy_update`, e.g. the toy's factorised image-head
    update, `lora.image_head`), by module name; the reference policy runs with them off."""
    return {n: m for n, m in model.named_modules() if getattr(m, "policy_update", False)}


POLICY_UPDATES_FILE = "policy_updates.safetensors"


def save_policy_updates(model: nn.Module, folder) -> None:
    """Write the parameters of the model's policy updates next to its saved LoRA adapter (none: no file).

    Reload with the same update registered on the same wrapping (e.g. `PeftModel.from_pretrained`, then
    `ToyUMM().add_image_head_update(peft_model)`), then `load_policy_updates(peft_model, folder)`.
    """
    tensors = {
        f"{name}.{k}": v.detach().contiguous().cpu()
        for name, m in policy_updates(model).items()
        for k, v in m.named_parameters()
    }
    if tensors:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(str(folder), POLICY_UPDATES_FILE))


def load_policy_updates(model: nn.Module, folder) -> None:
    """Load `save_policy_updates`' file into the model's (already registered) policy updates, checking names."""
    from safetensors.torch import load_file

    saved = load_file(os.path.join(str(folder), POLICY_UPDATES_FILE))
    params = {f"{name}.{k}": v for name, m in policy_updates(model).items() for k, v in m.named_parameters()}
    if set(saved) != set(params):
        raise ValueError(
            f"{folder}/{POLICY_UPDATES_FILE} holds {sorted(saved)} but the model's policy updates are "
            f"{sorted(params)}: register the same update on the same wrapping first (see save_policy_updates)"
        )
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """Run the reference policy: the same network with its LoRA adapter (and any policy update) switched off."""
    m = model.module if type(model).__name__ == "DeepSpeedEngine" else model
    if hasattr(m, "disable_adapter"):
        updates = list(policy_updates(m).values())
        # peft re-enables its layers with set_adapter(active), which freezes every other adapter: keep lora.scope=
        # split's understanding adapter trainable (the optimizer holds it)
        trainable = [p for p in m.parameters() if p.requires_grad]
        for u in updates:
            u.enabled = False
        try:
            with m.disable_adapter():
                yield
        finally:
            for u in updates:
                u.enabled = True
            for p in trainable:
                p.requires_grad_(True)
    else:
        raise TypeError(f"{type(m).__name__} has no LoRA adapter to disable: the reference needs a peft model")


UNDERSTANDING_ADAPTER = "understanding"  # lora.scope=split: the second adapter's peft name (and its subfolder)


def add_understanding_adapter(model: nn.Module, lora_config) -> None:
    """lora.scope=split: a second LoRA adapter of the same shape on the peft `model`, trainable beside the first.

    peft's add_adapter leaves a new adapter frozen (only the active one trains); both must be trainable when the
    optimizer is built, because one backward carries the generation loss into the first and the understanding
    loss into the second. Saved by save_pretrained into the adapter folder's `understanding/` subfolder."""
    model.add_adapter(UNDERSTANDING_ADAPTER, lora_config)
    for name, p in model.named_parameters():
        if f".{UNDERSTANDING_ADAPTER}." in name:
            p.requires_grad_(True)


@contextlib.contextmanager
def understanding_passes(model: nn.Module, scope: str):
    """The weights the understanding's passes (reward, joint RL's answers, captions) run under lora.scope:
    all: the one adapter (no change); generation: the adapter off (adapter_disabled); split: the understanding
    adapter instead of the generation one, policy updates (generation-only) off.

    split switches each LoRA layer's active adapter directly: peft's set_adapter would also set requires_grad on
    the adapters' weights, and the optimizer (and ZeRO's hooks) hold both adapters' weights for the whole run."""
    if scope == "generation":
        with adapter_disabled(model):
            yield
        return
    m = model.module if type(model).__name__ == "DeepSpeedEngine" else model
    if scope != "split":
        yield
        return
    if UNDERSTANDING_ADAPTER not in getattr(m, "peft_config", {}):  # else the generation adapter would read silently
        raise ValueError(f"lora.scope=split, but the model has no {UNDERSTANDING_ADAPTER!r} adapter: build it with "
                         "gvu.engine.build_policy (add_understanding_adapter) under the same config")  # fmt: skip
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [x for x in m.modules() if isinstance(x, BaseTunerLayer)]
    before = [x._active_adapter for x in layers]
    updates = list(policy_updates(m).values())
    for x in layers:
        x._active_adapter = UNDERSTANDING_ADAPTER
    for u in updates:
        u.enabled = False
    try:
        yield
    finally:
        for x, a in zip(layers, before, strict=True):
            x._active_adapter = a
        for u in updates:
            u.enabled = True


def attn_implementation(requested: str) -> str:
    """`requested`, except flash_attention_2 without flash-attn installed falls back to sdpa (with a warning)."""
    if requested == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            import warnings

            warnings.warn(
                "model.attn_implementation=flash_attention_2 but flash-attn is not installed; using sdpa", stacklevel=3
            )
            return "sdpa"
    return requested
