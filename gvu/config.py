"""Typed run configuration: nested dataclasses <- one YAML file per experiment <- `--section.field=value` overrides.

Every check names the field and how to fix it; the resolved config is saved next to every run.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gvu.rollout import SamplingConfig

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(__file__).resolve().parent
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LOGPROB_MODES = ("rollout", "conditional")
TEACHERS = ("policy", "reference")


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and the fix."""


@dataclass
class ModelConfig:
    backend: str = "toy"  # toy | janus
    path: str = "gvu/assets/toy_umm"  # checkpoint folder; relative paths resolve against the repo, then the cwd
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (when flash-attn is installed)
    gradient_checkpointing: bool = False
    max_rows: int = 0  # janus: rows (conditional + unconditional) per forward in rollout and scoring; 0: all at once
    instruction: str = "Describe the image in detail."  # janus: the user text of the reward's understanding turn

    def __post_init__(self):
        if self.backend not in ("toy", "janus"):
            raise ConfigError(f"model.backend must be 'toy' or 'janus', got {self.backend!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    # "all": one adapter for both directions (the paper's setup). "generation": the adapter runs only in
    # generation passes; every understanding pass (the reward, captions) runs with it disabled, so the trained
    # model's understanding is exactly the base's (a modality-specific adapter, like X-Omni's; DESIGN.md).
    scope: str = "all"
    # "factorised" (toy UMM, ZeRO-2): also train an update of the output head's image-code rows that is a sum of
    # shape, colour and size rows, so a colour learned on some shapes transfers to the others (README "Results")
    image_head: str = "none"

    def __post_init__(self):
        if self.scope not in ("all", "generation"):
            raise ConfigError(f"lora.scope must be 'all' or 'generation', got {self.scope!r}")
        if self.image_head not in ("none", "factorised"):
            raise ConfigError(f"lora.image_head must be 'none' or 'factorised', got {self.image_head!r}")
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if not self.target_modules:
            raise ConfigError(
                "lora.target_modules is empty; list the Linear layer names to adapt, e.g. [q_proj, v_proj]"
            )


@dataclass
class DataConfig:
    prompts: str = "shapes"  # "shapes": the toy world's generated sets; or a GenEval-format .jsonl path
    eval_file: str = ""  # held-out GenEval-format .jsonl when prompts is a file ("" : no held-out evaluation)
    seed: int = 0
    eval_prompts: int = 0  # 0: the whole held-out set; N: N prompts spread evenly over it
    # draw each step's prompts round-robin over tags (uniform per tag, as the score averages tags) instead of
    # uniformly over prompts (which the tags with thousands of compositional variants dominate)
    balance_tags: bool = False
    train_tags: list[str] = field(default_factory=list)  # train only on these tags ([]: all)


@dataclass
class GRPOSettings:
    prompts_per_step: int = 16  # B
    group_size: int = 8  # G samples per prompt
    beta: float = 0.04  # k3 KL weight to the adapter-disabled reference; 0 skips the reference pass
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO's clip-higher uses e.g. 0.28
    loss_type: str = "grpo"
    updates_per_rollout: int = 1  # >1 reuses a rollout (off-policy steps, ratio != 1)
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    adv_eps: float = 1e-4
    logprob_mode: str = "rollout"  # rollout: the distribution rollout sampled from (CFG-combined); conditional
    reward_teacher: str = "policy"  # policy: the current model scores (official GvU); reference: frozen base
    reward_eos: bool = False  # also score the caption's end token: the prompt must describe the whole image
    micro_batch_size: int = 0  # sequences per forward/backward (whole groups); 0: the whole step at once

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"grpo.scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.logprob_mode not in LOGPROB_MODES:
            raise ConfigError(f"grpo.logprob_mode must be one of {LOGPROB_MODES}, got {self.logprob_mode!r}")
        if self.reward_teacher not in TEACHERS:
            raise ConfigError(f"grpo.reward_teacher must be one of {TEACHERS}, got {self.reward_teacher!r}")
        if self.group_size < 2:
            raise ConfigError(
                f"grpo.group_size must be >= 2 (a group of 1 has no relative advantage), got {self.group_size}"
            )
        if self.prompts_per_step < 1 or self.updates_per_rollout < 1:
            raise ConfigError("grpo.prompts_per_step and grpo.updates_per_rollout must be >= 1")
        if self.eps_low < 0 or self.eps_high < 0 or self.beta < 0:
            raise ConfigError("grpo.eps_low, grpo.eps_high and grpo.beta must be >= 0")
        n = self.prompts_per_step * self.group_size
        mb = self.micro_batch_size
        if mb < 0 or (mb and (n % mb or mb % self.group_size)):
            raise ConfigError(
                f"grpo.micro_batch_size={mb} must be a multiple of group_size={self.group_size} that divides "
                f"prompts_per_step*group_size={n} (or 0 for the whole step at once)"
            )


@dataclass
class OptimConfig:
    lr: float = 1.5e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    # after warmup: "constant", or "cosine" from lr down to lr * min_lr_ratio at train.steps
    schedule: str = "constant"
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    steps: int = 300
    seed: int = 0
    output_dir: str = "runs/gvu-toy"
    deepspeed: str = "configs/ds_zero2.json"
    log_every: int = 10
    save_every: int = 100  # DeepSpeed checkpoint + adapter every N steps (and at the end)
    keep_checkpoints: int = 2  # newest DeepSpeed checkpoints kept; older ones are deleted after a save
    eval_samples: int = 16  # samples per held-out prompt in the before/after evaluation
    eval_before: bool = True
    eval_after: bool = True
    sample_grid_prompts: int = 8
    time_limit_minutes: float = 0.0  # 0: none; else stop training (then evaluate, save) after this long
    resume: bool = True  # continue from the newest checkpoint in output_dir
    profile: bool = False  # torch.profiler trace of a few steps + per-phase table
    threads: int = 0  # torch threads per rank; 0: cores / ranks

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"train.steps must be >= 0, got {self.steps}")
        if self.save_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("train.save_every and train.keep_checkpoints must be >= 1")
        if self.eval_samples < 1:
            raise ConfigError(f"train.eval_samples must be >= 1, got {self.eval_samples}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def resolve_path(p: str) -> Path:
    """A path from the config: absolute, else relative to the cwd if it exists there, else to the repo."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO / path


def _coerce(value, typ, where: str):
    """Convert a YAML/CLI value to the dataclass field's type, or raise naming the field."""
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, inner, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ in (int, float, str):
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {typ.__name__}, got {value!r}") from None
    return value


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {sorted(prefix + k for k in unknown)}; known in {prefix or 'root'}: {names}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        typ, val = hints[name], data[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(val, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of fields, got {val!r}")
            kwargs[name] = _build(typ, val, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(val, typ, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # e.g. SamplingConfig's own checks
        raise ConfigError(str(e)) from None


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + `--a.b=value` / `a.b=value` overrides -> validated Config."""
    tree: dict = {}
    if path is not None:
        p = resolve_path(str(path))
        if not p.exists():
            raise ConfigError(f"config file {path} not found (looked in the cwd and in {REPO})")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, grpo, ...)")
    for item in overrides or []:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like --section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key, yaml.safe_load(raw) if raw else "")
    return _build(Config, tree, "")


def config_from_dict(d: dict) -> Config:
    return _build(Config, json.loads(json.dumps(d)), "")
