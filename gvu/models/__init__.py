"""Model backends by name (`model.backend`), and the wrapping helpers every backend uses.

    backend_class("janus")        -> the registered class (imported on first use)
    load_umm(cfg.model)           -> (backend, transformers model)
    register_backend("mine", "my_pkg.my_module:MyUMM")   # a new backend (docs/DESIGN.md, "Adding a backend")

The contract a backend meets is gvu.models.base.UMMBackend; `contract_problems` checks a class against it.
"""

from __future__ import annotations

import importlib

from gvu.models.base import Ability, PromptBatch, UMMBackend, UnderstandingInputs, contract_problems, require
from gvu.models.wrapping import (
    POLICY_UPDATES_FILE,
    UNDERSTANDING_ADAPTER,
    adapter_disabled,
    add_understanding_adapter,
    attn_implementation,
    backbone_and_head,
    gathered,
    load_policy_updates,
    partitioned,
    policy_updates,
    save_policy_updates,
    saveable,
    understanding_passes,
    unwrap,
)

__all__ = [
    "Ability", "PromptBatch", "UMMBackend", "UnderstandingInputs", "contract_problems", "require",
    "POLICY_UPDATES_FILE", "UNDERSTANDING_ADAPTER", "add_understanding_adapter", "adapter_disabled",
    "attn_implementation", "backbone_and_head", "gathered", "partitioned", "load_policy_updates", "policy_updates",
    "save_policy_updates", "saveable", "understanding_passes", "unwrap",
    "register_backend", "backend_names", "backend_class", "load_umm",
]  # fmt: skip

# name -> "module:Class" (imported lazily, so naming a backend costs nothing until it is used)
_REGISTRY: dict[str, str | type] = {
    "toy": "gvu.toy.backend:ToyUMM",
    "janus": "gvu.models.janus:JanusUMM",
}
_REGISTRY["xomni"] = "gvu.models.xomni.backend:XOmniUMM"


def register_backend(name: str, target: str | type) -> None:
    """Make `model.backend: name` load `target` (a class, or "module:Class"); re-registering a name replaces it."""
    _REGISTRY[name] = target


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def backend_class(name: str) -> type:
    """The backend class registered as `name`, checked against the contract; unknown names list the known ones."""
    from gvu.config import ConfigError

    if name not in _REGISTRY:
        raise ConfigError(f"model.backend={name!r} is not a registered backend; known: {backend_names()}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = target
    problems = contract_problems(target)
    if problems:
        raise TypeError(f"backend {name!r} ({target.__module__}.{target.__name__}) breaks the contract: {problems}")
    return target


def load_umm(cfg):
    """(backend, transformers model) for a `ModelConfig`: the backend named by cfg.backend, weights from cfg.path."""
    return backend_class(cfg.backend).load(cfg)
