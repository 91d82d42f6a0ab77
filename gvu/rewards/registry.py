"""Rewards registered by name (grpo.rewards), and the configuration check of the configured ones.

    @register_reward("mine")                     # then grpo.rewards: [{name: mine, weight: 1.0}, ...]
    def mine(backend, model, images, codes, prompts, metas, cfg) -> torch.Tensor: ...

A reward receives the rollout of one rank's step (N = B*G rows, row b*G+g is sample g of prompt b):
    backend   the UMMBackend (gvu/models/base.py); `model` the module to run (the policy or, with
              grpo.reward_teacher=reference or lora.scope=generation, the adapter-disabled base)
    images    uint8 (N, H, W, 3), the decoded images; codes int64 (N, L) the image tokens they decode
    prompts   the PromptBatch of N rows (each prompt repeated G times); metas: N GenEval metadata dicts
              (tag, prompt, include, exclude), one per row; cfg: the run's gvu.config.Config
and returns fp32 (N,), one value per row, higher is better; NaN for a row it cannot score (left out: gvu.rewards.mix).
It runs under torch.no_grad().
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from gvu.models.base import require


@dataclass(frozen=True)
class Reward:
    """A registered reward: its callable, the backend abilities it needs (and why), a check of the config, and
    whether it reads the prompts' GenEval metadata (`include`)."""

    name: str
    fn: Callable
    needs: frozenset = frozenset()
    why: str = ""
    check: Callable | None = None  # (cfg, backend class) -> problems
    metadata: bool = False


_REGISTRY: dict[str, Reward] = {}


def register_reward(name: str, *, needs=(), why: str = "", check=None, metadata: bool = False):
    """Decorator: register `fn(backend, model, images, codes, prompts, metas, cfg) -> fp32 (N,)` as `name`."""

    def deco(fn):
        if not callable(fn):
            raise TypeError(f"reward {name!r} must be callable, got {fn!r}")
        if name in _REGISTRY:
            raise ValueError(f"a reward named {name!r} is already registered; pick another name")
        _REGISTRY[name] = Reward(name, fn, frozenset(needs), why, check, metadata)
        return fn

    return deco


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str) -> Reward:
    if name not in _REGISTRY:
        raise KeyError(unknown(name))
    return _REGISTRY[name]


def unknown(name: str) -> str:
    near = difflib.get_close_matches(str(name), reward_names(), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"grpo.rewards names {name!r}, which is not a registered reward; {hint}registered: {reward_names()}"


def entry_problems(entries) -> list[str]:
    """Field-level problems of grpo.rewards (gvu.config): a non-empty list of {name: str, weight: finite number},
    names distinct, at least one weight nonzero."""
    form = "grpo.rewards entries look like {name: gvu, weight: 1.0}"
    if not isinstance(entries, list) or not entries:
        return [f"grpo.rewards must list at least one reward; {form}"]
    out, names = [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or set(e) - {"name", "weight"}:
            out.append(f"grpo.rewards[{i}] = {e!r}: {form} (keys name and weight only)")
            continue
        w = e.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            out.append(f"grpo.rewards[{i}] ({e['name']}): weight must be a finite number, got {w!r}")
        names.append(e["name"])
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        out.append(f"grpo.rewards lists {dup} more than once; list each reward once with its weight")
    if not out and all(float(e.get("weight", 1.0)) == 0 for e in entries):
        out.append("grpo.rewards: every weight is 0, so nothing trains; give at least one reward a nonzero weight")
    return out


def reward_problems(cfg, backend) -> list[str]:
    """The configured rewards against the registry and the backend class: unknown names (with the nearest
    registered one), abilities a reward needs that the backend lacks, each reward's own check."""
    out = []
    for e in cfg.grpo.rewards:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            continue  # reported by entry_problems
        if e["name"] not in _REGISTRY:
            out.append(unknown(e["name"]))
            continue
        r = _REGISTRY[e["name"]]
        for a in sorted(r.needs, key=lambda a: a.value):
            if require(backend, a):
                out.append(
                    f"grpo.rewards: {r.name} needs the backend ability {a.value!r}, which model.backend="
                    f"{backend.name!r} does not have{': ' + r.why if r.why else ''}"
                )
        out += r.check(cfg, backend) if r.check else []
    return out


def weights(g) -> list[tuple[str, float]]:
    """(name, weight) of grpo.rewards (g: cfg.grpo) in order; weight 1.0 when left out."""
    return [(e["name"], float(e.get("weight", 1.0))) for e in g.rewards]
