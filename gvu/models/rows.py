"""Rows per forward from a memory budget: what rollout and scoring may batch in one forward of the network.

    shape = backend.memory_shape(cfg.model)                 # sizes from the checkpoint's config.json (base.py)
    need = row_bytes(shape, "rollout", seq_len=P + L, dtype_bytes=2)   # bytes one sequence needs, by part
    rows = plan_rows(shape, "rollout", budget_bytes, seq_len=P + L, dtype_bytes=2).rows
    planner = RowPlanner(shape, max_rows, budget_gb)        # what a backend holds: plans at first use, logs once

A row is one sequence: with CFG a prompt's conditional and unconditional rows are two (as `model.max_rows` counts).
Per sequence of S tokens, in the model's dtype (b bytes) unless fp32 is said:
    rollout   KV cache 2 x layers x kv_heads x head_dim x S x b, plus the larger of the prefill's and one decode
              step's transient activations (one layer at a time) and the step's (K,) code logits in fp32 (x3:
              logits, CFG-combined, probabilities)
    score     teacher-forced, no grad: one layer's transient activations over S tokens (+ its S x S attention
              scores in fp32, as the math attention path forms them) and the image head's features
    score     with grad: every layer's saved activations over S tokens (SAVED_HIDDEN / _INTERMEDIATE: high),
    (grad)    or with gradient checkpointing each layer's input only plus one layer's recomputed activations
Budget: `model.memory_budget_gb`, or 0 = automatic: CUDA_FRACTION x the device's free memory (with the caching
allocator's reserved-but-unused blocks) when first planned, i.e. after the model is on its device; on CPU
CPU_FRACTION x MemAvailable. An explicit `model.max_rows` wins over any plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

CUDA_FRACTION = 0.8  # headroom for the allocator's fragmentation and for what other passes hold meanwhile
CPU_FRACTION = 0.5  # of MemAvailable: the machine is shared (other ranks, data, the OS page cache)
GIB = 2**30
# Saved for backward per token per layer, in units of (hidden, intermediate) values, counted high: a Llama layer
# keeps its input, the two norms' outputs, q, the attention output, o_proj's input and the residual (~8 hidden,
# k/v counted apart), and gate, up, act(gate) and their product (4 intermediate); LoRA's inputs alias these.
SAVED_HIDDEN, SAVED_INTERMEDIATE = 10, 4
# One layer's transient forward activations per token: residual, norm, attention output, MLP output (4 hidden)
# and gate, up, their product (3 intermediate).
STEP_HIDDEN, STEP_INTERMEDIATE = 4, 3


@dataclass(frozen=True)
class MemoryShape:
    """The sizes the planner needs, read from a checkpoint's transformers config (`UMMBackend.memory_shape`)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    codes: int  # K: the code logits rollout forms per step
    head_width: int  # features the image head's last Linear reads (Janus: the head's projection; else hidden)
    image_tokens: int  # tokens an image takes in the generation sequence
    understanding_tokens: int  # tokens an image takes in the understanding sequence


@dataclass(frozen=True)
class RowPlan:
    """Sequences per forward and the numbers behind them (bytes)."""

    rows: int
    budget: int
    per_row: int
    parts: dict

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.parts.items())
        mib = self.per_row / 2**20
        return f"{self.rows} sequences = {self.budget / GIB:.2f} GiB / {mib:.1f} MiB a sequence ({parts})"


def row_bytes(
    s: MemoryShape, kind: str, seq_len: int, dtype_bytes: int, *, prefix_len: int = 0, grad: bool = False,
    checkpointing: bool = False, attn_probs: bool = False,
) -> dict[str, int]:  # fmt: skip
    """Bytes one sequence of `seq_len` tokens needs in one forward of `kind` ("rollout" or "score"), by part.

    prefix_len: the rollout's prefill length; grad: scoring keeps activations for backward; attn_probs: the
    attention saves its (heads, S, S) probabilities for backward (eager attention; sdpa / flash keep O(S))."""
    b, S = dtype_bytes, seq_len
    layer_step = STEP_HIDDEN * s.hidden + STEP_INTERMEDIATE * s.intermediate
    if kind == "rollout":
        P = prefix_len or 1
        prefill = P * layer_step * b + s.heads * P * P * 4
        step = layer_step * b + s.heads * S * 4 + 3 * s.codes * 4
        return {"kv_cache": 2 * s.layers * s.kv_heads * s.head_dim * S * b, "activations": max(prefill, step)}
    if kind != "score":
        raise ValueError(f"kind must be 'rollout' or 'score', got {kind!r}")
    transient = S * layer_step * b + s.heads * S * S * 4
    head = S * s.head_width * (2 * b + 4)  # the features, their fp32 CFG combination and its gradient
    if not grad:
        return {"activations": transient, "head": head}
    per_token = (SAVED_HIDDEN * s.hidden + SAVED_INTERMEDIATE * s.intermediate + 2 * s.kv_heads * s.head_dim) * b
    per_layer = S * per_token + (s.heads * S * S * b if attn_probs else 0)
    saved = s.layers * S * s.hidden * b + per_layer if checkpointing else s.layers * per_layer
    return {"saved_for_backward": saved, "activations": transient, "head": head}


def plan_rows(s: MemoryShape, kind: str, budget: int, seq_len: int, dtype_bytes: int, **kw) -> RowPlan:
    """The most sequences whose `row_bytes` fit in `budget` bytes (0 when not even one does)."""
    parts = row_bytes(s, kind, seq_len, dtype_bytes, **kw)
    per_row = sum(parts.values())
    return RowPlan(int(budget // per_row), int(budget), per_row, parts)


def too_small(plan: RowPlan, need: int, what: str) -> str | None:
    """The config error when `plan` holds fewer than `need` sequences (a CFG row is 2), else None."""
    if plan.rows >= need:
        return None
    return (
        f"model.memory_budget_gb: a budget of {plan.budget / GIB:.3g} GiB holds {plan.rows} sequences of {what}, but "
        f"one row needs {need} ({need * plan.per_row / GIB:.3g} GiB: {plan.describe()}); raise the budget (0 = "
        "automatic) or set model.max_rows"
    )


def automatic_budget(device: torch.device) -> tuple[int, str]:
    """(bytes, how it was found) for memory_budget_gb = 0 on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_FRACTION * free), f"auto: {CUDA_FRACTION} x {free / GIB:.1f} GiB free on {device}"
    avail = mem_available()
    return int(CPU_FRACTION * avail), f"auto: {CPU_FRACTION} x {avail / GIB:.1f} GiB MemAvailable"


def mem_available(default: int = 8 * GIB) -> int:
    """MemAvailable of /proc/meminfo in bytes (`default` where there is none; 8 GiB, a stated guess)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return default


def config_problems(shape: MemoryShape, budget_gb: float, dtype_bytes: int, cfg_rows: int, **score_kw) -> list[str]:
    """What the config check can know before loading: a budget too small for one row of rollout or of scoring with
    grad, at the shortest sequences (an image and one prompt token), so a budget refused here is too small."""
    S, U = shape.image_tokens + 2, shape.understanding_tokens + 2
    cases = [("rollout", S, {"prefix_len": 2}, cfg_rows), ("score", S, {"grad": True, **score_kw}, cfg_rows),
             ("score", U, {"grad": False}, 1)]  # fmt: skip
    out = []
    for kind, n, kw, need in cases:
        plan = plan_rows(shape, kind, int(budget_gb * GIB), n, dtype_bytes, **kw)
        problem = too_small(plan, need, f"at least {n} tokens ({kind}{', with grad' if kw.get('grad') else ''})")
        out += [problem] if problem else []
    return out[:1]  # the first is enough to say the budget is too small


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


class RowPlanner:
    """A backend's rows per forward: `model.max_rows` when set, else planned from the budget at first use (when
    the model is on its device) and logged once per kind on rank 0. shape None (a backend built without its model
    config) plans nothing: all rows at once."""

    def __init__(self, shape: MemoryShape | None, max_rows: int = 0, budget_gb: float = 0.0):
        self.shape, self.max_rows, self.budget_gb = shape, max_rows, budget_gb
        self._budget: tuple[int, str] | None = None
        self.logged: dict[str, str] = {}

    def budget(self, device: torch.device) -> tuple[int, str]:
        if self._budget is None:
            gb = self.budget_gb
            self._budget = (int(gb * GIB), f"model.memory_budget_gb={gb}") if gb > 0 else automatic_budget(device)
        return self._budget

    def chunk(self, kind: str, n: int, cfg: bool, model, seq_len: int, prefix_len: int = 0) -> int:
        """Prompt rows per forward of a call over `n` rows (each 2 sequences when `cfg`)."""
        per = 2 if cfg else 1
        if self.max_rows:
            return max(1, self.max_rows // per)
        if self.shape is None:
            return max(n, 1)
        from gvu.models.wrapping import unwrap

        m = unwrap(model)
        p = next(m.parameters())
        grad = kind == "score" and torch.is_grad_enabled()
        kw = {"prefix_len": prefix_len} if kind == "rollout" else {"grad": grad}
        if grad:
            # transformers 5 renamed the flag (the old name warns)
            flag = "is_activation_checkpointing"
            flag = flag if hasattr(type(m), flag) else "is_gradient_checkpointing"
            kw["checkpointing"] = bool(getattr(m, flag, False))
            kw["attn_probs"] = getattr(m.config, "_attn_implementation", "sdpa") == "eager"
        budget, source = self.budget(p.device)
        plan = plan_rows(self.shape, kind, budget, seq_len, p.element_size(), **kw)
        what = f"{seq_len} tokens ({kind}{', with grad' if grad else ''})"
        problem = too_small(plan, per, what)
        if problem:
            from gvu.config import ConfigError

            raise ConfigError(problem)
        key = kind + ("+grad" if grad else "")
        if key not in self.logged:
            self.logged[key] = f"rows per forward, {what}: {plan.describe()}; budget {source}"
            if _is_main():
                print(self.logged[key], flush=True)
        return max(1, min(n, plan.rows // per))


def read_config(config_class, folder):
    """`config_class` from folder/config.json; FileNotFoundError without one (from_pretrained would fall back to the
    class defaults, e.g. a 7B Llama, silently)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing")
    return config_class.from_json_file(str(path))


def shape_of_llama(config, **sizes) -> MemoryShape:
    """MemoryShape of a Llama / Qwen2-like text config (head_dim defaults to hidden / heads) and the layout sizes
    (codes, head_width, image_tokens, understanding_tokens)."""
    heads = config.num_attention_heads
    return MemoryShape(
        layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, **sizes,
    )  # fmt: skip


__all__ = [
    "MemoryShape", "RowPlan", "RowPlanner", "row_bytes", "plan_rows", "too_small", "automatic_budget",
    "config_problems", "read_config", "shape_of_llama",
]  # fmt: skip
