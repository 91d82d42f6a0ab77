"""Typed run configuration: nested dataclasses <- one YAML file per experiment <- `--section.field=value` overrides.

Every field carries its help (`python gvu/train.py --help` lists them). Loading collects every type and value
problem of the file and the overrides at once; the checks that need more than one section, the files or the
backend run in gvu/validate.py, before anything starts. The resolved config is saved next to every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
JOINT_SOURCES, QUESTION_KINDS = ("rendered", "generated", "both"), ("count", "color", "size", "shape", "position")


class ConfigError(ValueError):
    """Bad configuration: one or more problems, each naming the field (or file and line) and the fix."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems))


def failing(*checks: tuple[str, object]) -> list[str]:
    """The messages of the (message, failed) checks that failed, in order."""
    return [msg for msg, failed in checks if failed]


def opt(default, help: str, choices: tuple | None = None):
    """A config field with its help text (and allowed values, checked at load time)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):  # entries copied too: they may be mappings (grpo.rewards)
        return field(default_factory=lambda: [dict(e) if isinstance(e, dict) else e for e in default], metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    backend: str = opt("toy", "registered backend name (gvu.models.backend_names(): toy, janus, xomni)")
    path: str = opt("gvu/assets/toy_umm", "checkpoint folder (relative: the cwd, then the repo), or a cached hub id")
    dtype: str = opt("float32", "weights and activations dtype", ("float32", "bfloat16", "float16"))
    attn_implementation: str = opt("sdpa", "transformers attention; flash_attention_2 falls back to sdpa without "
        "flash-attn", ("sdpa", "eager", "flash_attention_2"))  # fmt: skip
    gradient_checkpointing: bool = opt(False, "recompute the decoder's activations in backward (less memory)")
    max_rows: int = opt(0, "rows (conditional + unconditional) per forward in rollout and scoring; 0: planned")
    memory_budget_gb: float = opt(0.0, "GiB rows per forward are planned in when max_rows is 0 (gvu/models/rows.py)")
    instruction: str = opt("Describe the image in detail.", "janus, xomni: the user text of the reward's "
        "understanding turn")  # fmt: skip

    def problems(self) -> list[str]:
        msg = "model.max_rows and model.memory_budget_gb must be >= 0 (0: planned / automatic)"
        return failing((msg, min(self.max_rows, self.memory_budget_gb) < 0))


@dataclass
class LoraSettings:
    r: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = opt(0.0, "LoRA dropout")
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layer names to adapt (a backend may narrow them to its language model)")  # fmt: skip
    scope: str = opt("all", "all: one adapter for both directions (the paper); generation: the adapter runs only "
        "in generation passes, so the reward and every understanding pass are the base's; split (joint RL): a "
        "second adapter runs in every understanding pass (the reward included), trained by the joint task only",
        ("all", "generation", "split"))  # fmt: skip
    image_head: str = opt("none", "factorised: also train an update of the head's image-code rows as shape + colour "
        "+ size rows (toy, ZeRO-2)", ("none", "factorised"))  # fmt: skip

    def problems(self) -> list[str]:
        return failing(
            (f"lora.r must be >= 1, got {self.r}", self.r < 1),
            ("lora.target_modules is empty; list the Linear layer names to adapt, e.g. [q_proj, v_proj]",
             not self.target_modules),
            ("lora.target_modules names lm_head, whose weight the log-prob kernels read directly, so the adapter "
             "would be silently ignored; adapt the decoder's layers only", "lm_head" in self.target_modules),
        )  # fmt: skip


@dataclass
class DataConfig:
    prompts: str = opt("shapes", "'shapes' (the toy world's generated sets) or a GenEval-format .jsonl of prompts")
    eval_file: str = opt("", "held-out GenEval-format .jsonl when prompts is a file ('': no held-out evaluation)")
    seed: int = opt(0, "seed of the prompt sets and of the sampler's order")
    eval_prompts: int = opt(0, "0: the whole held-out set; N: N prompts spread evenly over it")
    balance_tags: bool = opt(False, "draw each step's prompts round-robin over tags instead of uniformly")
    train_tags: list[str] = opt([], "train only on these tags ([]: all)")

    def problems(self) -> list[str]:
        return ["data.eval_prompts must be >= 0"] if self.eval_prompts < 0 else []


@dataclass
class SamplingConfig:
    """How image tokens are drawn (rollout and evaluation). `cfg_scale` 1.0 means no classifier-free guidance."""

    temperature: float = opt(1.0, "softmax temperature of rollout (use greedy for argmax)")
    top_k: int = opt(0, "keep the k most likely codes; 0: off")
    top_p: float = opt(1.0, "nucleus sampling mass; 1.0: off")
    min_p: float = opt(0.0, "drop codes below min_p x the top probability; 0.0: off")
    cfg_scale: float = opt(1.0, "classifier-free guidance scale; 1.0: off")
    greedy: bool = opt(False, "argmax instead of sampling")
    cuda_graph: bool = opt(True, "on CUDA, replay each decode step from a captured CUDA graph (sdpa/eager attention, "
        "not ZeRO-3); falls back to eager decoding with a log line when capture is not possible")  # fmt: skip

    def problems(self) -> list[str]:
        return failing(
            (f"sampling.temperature must be > 0 (use sampling.greedy=true for argmax); got {self.temperature}",
             self.temperature <= 0),
            (f"sampling.top_k must be >= 0 (0 disables it); got {self.top_k}", self.top_k < 0),
            (f"sampling.top_p must be in (0, 1]; got {self.top_p}", not 0 < self.top_p <= 1),
            (f"sampling.min_p must be in [0, 1); got {self.min_p}", not 0 <= self.min_p < 1),
            (f"sampling.cfg_scale must be >= 1 (1 disables guidance); got {self.cfg_scale}", self.cfg_scale < 1),
        )  # fmt: skip


@dataclass
class GRPOSettings:
    prompts_per_step: int = opt(16, "B: prompts per optimizer step, over all ranks")
    group_size: int = opt(8, "G: samples per prompt (the group of the relative advantage)")
    beta: float = opt(0.04, "k3 KL weight to the adapter-disabled reference; 0 skips the reference pass")
    eps_low: float = opt(0.2, "lower clip of the ratio")
    eps_high: float = opt(0.2, "upper clip of the ratio (DAPO's clip-higher uses e.g. 0.28)")
    loss_type: str = opt("grpo", "token reduction of the loss (gvu/grpo.py)", LOSS_TYPES)
    updates_per_rollout: int = opt(1, ">1 reuses a rollout for more optimizer steps (off-policy, ratio != 1)")
    scale_rewards: str = opt("group", "advantage scale: group std, batch std, or none (Dr. GRPO)",
        ("group", "batch", "none"))  # fmt: skip
    adv_eps: float = opt(1e-4, "added to the std in the advantage's denominator")
    logprob_mode: str = opt(
        "rollout", "rollout: score the CFG-combined distribution rollout sampled from; conditional: the conditional "
        "branch only (off-policy at cfg_scale > 1)", ("rollout", "conditional"),
    )  # fmt: skip
    reward_teacher: str = opt(
        "policy", "policy: the current model scores its images (official GvU); reference: the frozen base",
        ("policy", "reference"),
    )  # fmt: skip
    reward_eos: bool = opt(False, "also score the caption's end token: the prompt must describe the whole image")
    rewards: list[dict] = opt([{"name": "gvu", "weight": 1.0}], "rewards by name and weight, e.g. [{name: gvu, "
        "weight: 1.0}, {name: qa, weight: 0.5}]: gvu, qa, yes_prob, oracle (toy) or register_reward's (gvu/rewards/); "
        "weight 0: logged, not trained on")  # fmt: skip
    reward_mix: str = opt("rewards", "rewards: the advantage of grpo.rewards' weighted sum; advantages: the weighted "
        "sum of each reward's own group advantage (gvu/rewards/mix.py)", ("rewards", "advantages"))  # fmt: skip
    micro_batch_size: int = opt(0, "sequences per forward/backward (whole groups); 0: the rank's whole step at once")

    def problems(self) -> list[str]:
        n, mb = self.prompts_per_step * self.group_size, self.micro_batch_size
        return failing(
            (f"grpo.group_size must be >= 2 (a group of 1 has no relative advantage), got {self.group_size}",
             self.group_size < 2),
            ("grpo.prompts_per_step and grpo.updates_per_rollout must be >= 1",
             min(self.prompts_per_step, self.updates_per_rollout) < 1),
            ("grpo.eps_low, grpo.eps_high and grpo.beta must be >= 0", min(self.eps_low, self.eps_high, self.beta) < 0),
            (f"grpo.micro_batch_size={mb} must be a multiple of group_size={self.group_size} that divides "
             f"prompts_per_step*group_size={n} (or 0 for the whole step at once)",
             mb < 0 or (mb and (n % mb or mb % max(self.group_size, 1)))),
        )  # fmt: skip


@dataclass
class JointConfig:
    """Joint RL (CoRL-style, gvu/joint.py): an understanding task in the same step, on the same adapter (toy only)."""

    enabled: bool = opt(False, "also train understanding: multiple-choice questions about images, GRPO on answers")
    weight: float = opt(1.0, "und_weight: loss = gen_weight * L_gen + weight * L_und, one backward of the sum")
    gen_weight: float = opt(1.0, "gen_weight of the generation loss in the joint loss")
    source: str = opt("rendered", "the questions' images: rendered (fresh scenes of train prompts from (seed, step)), "
        "generated (this step's rollout; truth = what the exact evaluator reads in it) or both (half each)",
        JOINT_SOURCES)  # fmt: skip
    questions_per_step: int = opt(16, "questions per step over all ranks (a question: one fact of a prompt)")
    group_size: int = opt(8, "answers drawn per question (the group of the relative advantage)")
    temperature: float = opt(1.0, "softmax temperature of the answer policy over a question's choices")
    beta: float = opt(0.0, "k3 KL weight of the answers to the adapter-disabled reference; 0 skips that pass")
    kinds: list[str] = opt(list(QUESTION_KINDS), f"question kinds asked, each drawn equally often: {QUESTION_KINDS}")
    captions_per_step: int = opt(0, "scenes per step over all ranks that the understanding also captions in free "
        "text (group_size sampled captions each, reward 1 when the caption, parsed, holds for the scene: what "
        "caption accuracy reads), GRPO on the caption tokens; 0: none")  # fmt: skip

    def problems(self) -> list[str]:
        return failing(
            (f"joint.questions_per_step must be >= 1, got {self.questions_per_step}", self.questions_per_step < 1),
            (f"joint.captions_per_step must be >= 0, got {self.captions_per_step}", self.captions_per_step < 0),
            (f"joint.group_size must be >= 2 (a group of 1 has no relative advantage), got {self.group_size}",
             self.group_size < 2),
            ("joint.temperature must be > 0; joint.beta, joint.weight and joint.gen_weight >= 0",
             self.temperature <= 0 or min(self.beta, self.weight, self.gen_weight) < 0),
            (f"joint.kinds={self.kinds}: list one or more of {list(QUESTION_KINDS)}",
             not self.kinds or set(self.kinds) - set(QUESTION_KINDS)),
        )  # fmt: skip


@dataclass
class OptimConfig:
    lr: float = opt(1.5e-3, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    betas: list[float] = opt([0.9, 0.99], "AdamW betas")
    warmup_steps: int = opt(10, "linear warmup steps")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    schedule: str = opt("constant", "after warmup: constant, or cosine down to lr x min_lr_ratio",
        ("constant", "cosine"))  # fmt: skip
    min_lr_ratio: float = opt(0.1, "the cosine's final lr as a fraction of lr")

    def problems(self) -> list[str]:
        return failing(
            (f"optim.lr must be > 0, got {self.lr}", self.lr <= 0),
            (f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}", not 0 <= self.min_lr_ratio <= 1),
            (f"optim.betas must be two numbers, got {self.betas}", len(self.betas) != 2),
        )


@dataclass
class TrainConfig:
    steps: int = opt(300, "optimizer steps")
    seed: int = opt(0, "seed of rollout sampling and of the evaluation's samples")
    output_dir: str = opt("runs/gvu-toy", "run folder: config, metrics, TensorBoard, samples, adapter, checkpoints")
    deepspeed: str = opt("configs/ds_zero2.json", 'DeepSpeed JSON; its "auto" values are filled from this config')
    log_every: int = opt(10, "print a line every N steps")
    save_every: int = opt(10, "checkpoint + adapter every N steps (and at the end, and on SIGTERM/SIGINT/SIGUSR1); "
        "a kill -9 loses at most N - 1 steps. Checkpoints hold only the trained parameters and their optimizer state, "
        "so saves are cheap")  # fmt: skip
    keep_checkpoints: int = opt(2, "newest checkpoints kept; older ones are deleted after a save")
    eval_samples: int = opt(16, "samples per held-out prompt in the before/after evaluation")
    eval_before: bool = opt(True, "evaluate the base on the held-out prompts before training")
    eval_after: bool = opt(True, "evaluate the trained policy after training")
    sample_grid_prompts: int = opt(8, "held-out prompts in samples_before/after.png (4 samples each)")
    time_limit_minutes: float = opt(0.0, "stop training (then evaluate and save) after this long; 0: no limit")
    resume: bool = opt(True, "continue from the newest checkpoint in output_dir that loads")
    allow_changes: list[str] = opt([], "fields or sections (e.g. [optim.lr] or [grpo]) allowed to differ from the "
        "saved config on resume")  # fmt: skip
    profile: bool = opt(False, "torch.profiler trace of steps 2-4 into output_dir/profile")
    threads: int = opt(0, "torch threads per rank; 0: cores / ranks")

    def problems(self) -> list[str]:
        return failing(
            (f"train.steps must be >= 0, got {self.steps}", self.steps < 0),
            ("train.save_every, train.keep_checkpoints and train.log_every must be >= 1",
             min(self.save_every, self.keep_checkpoints, self.log_every) < 1),
            (f"train.eval_samples must be >= 1, got {self.eval_samples}", self.eval_samples < 1),
        )  # fmt: skip


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    joint: JointConfig = field(default_factory=JointConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def problems(self) -> list[str]:
        """Every field-level problem of every section (choices and each section's own checks)."""
        out = []
        for sec in dataclasses.fields(self):
            section = getattr(self, sec.name)
            for f in dataclasses.fields(section):
                choices = f.metadata.get("choices")
                if choices and getattr(section, f.name) not in choices:
                    out.append(f"{sec.name}.{f.name} must be one of {list(choices)}, got {getattr(section, f.name)!r}")
            out += section.problems()
        return out


def sections() -> list[tuple[str, type]]:
    """(section name, dataclass) of the config, in order."""
    hints = typing.get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Config)]


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


def _build(cls, data: dict, prefix: str, problems: list[str]):
    """The dataclass `cls` from a mapping; unknown fields and bad types are appended to `problems`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in sorted(set(data) - set(names)):
        near = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {prefix}{near[0]}?" if near else f"; known in {prefix or 'root'}: {names}"
        problems.append(f"unknown config field {prefix}{k}{hint}")
    kwargs = {}
    for name in (n for n in names if n in data):
        typ, val = hints[name], data[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(val, dict):
                problems.append(f"{prefix}{name} must be a mapping of fields, got {val!r}")
                continue
            kwargs[name] = _build(typ, val, f"{prefix}{name}.", problems)
        else:
            try:
                kwargs[name] = _coerce(val, typ, prefix + name)
            except ConfigError as e:
                problems += e.problems
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_config(path: str | Path | None = None, overrides: list[str] | None = None) -> tuple[Config, list[str]]:
    """YAML file (optional) + `--a.b=value` / `a.b=value` overrides -> (Config, every problem found). Fields with a
    problem keep their defaults. Raises ConfigError only when there is nothing to build from (a missing or invalid
    YAML file, an override without `=`)."""
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
    problems: list[str] = []
    cfg = _build(Config, tree, "", problems)
    return cfg, problems + cfg.problems()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """parse_config, raising ConfigError with every problem when there is any."""
    cfg, problems = parse_config(path, overrides)
    if problems:
        raise ConfigError(problems)
    return cfg


def field_help() -> list[tuple[str, list[tuple[str, str, object, str]]]]:
    """[(section, [(field, type name, default, help)])] for `--help`."""
    out = []
    for name, cls in sections():
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            t = hints[f.name]
            tname = f"list[{typing.get_args(t)[0].__name__}]" if typing.get_origin(t) is list else t.__name__
            help_ = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_ += f" {{{', '.join(map(str, f.metadata['choices']))}}}"
            rows.append((f.name, tname, default, help_))
        out.append((name, rows))
    return out
