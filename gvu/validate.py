"""The one configuration check, run before any process group, run folder or model load (gvu/train.py).

    check(cfg, world)                    -> None, or ConfigError listing every problem found, each naming the
                                            field (or the file and line) and the fix
    load_checked(path, overrides, world) -> Config: the YAML + overrides' problems and check's, reported together

It covers what needs more than one field: the backend (registered, its checkpoint folder, the abilities that
options need, a model.memory_budget_gb too small for one row), grpo.rewards (their form and weights, registered
names, what each needs of the backend and of the prompts' metadata), joint RL (the toy backend, lora.scope all or split,
prompts with questions), the DeepSpeed JSON and its ZeRO stage, the per-rank batch arithmetic, the prompt files
(every line), the tags, and every prompt's words against a backend with a closed vocabulary. Field-level checks
(ranges, choices) already ran when the config was loaded (gvu.config.load_config).
"""

from __future__ import annotations

from pathlib import Path

from gvu.config import Config, ConfigError, parse_config
from gvu.models import Ability, backend_class, require

MAX_LISTED = 10  # prompt problems listed one by one; the rest are counted


def check(cfg: Config, world: int = 1) -> None:
    problems = backend_problems(cfg) + engine_problems(cfg, world) + data_problems(cfg)
    if problems:
        raise ConfigError(problems)


def load_checked(path: str | Path | None, overrides: list[str], world: int = 1) -> Config:
    """The run's Config, or ConfigError with every problem of the file, the overrides and the check at once."""
    cfg, problems = parse_config(path, overrides)
    try:
        check(cfg, world)  # fields with a problem kept their defaults, so this finds the other fields' problems
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def backend_problems(cfg: Config) -> list[str]:
    from gvu.rewards import entry_problems, reward_problems

    rewards = entry_problems(cfg.grpo.rewards)
    try:
        backend = backend_class(cfg.model.backend)
    except ConfigError as e:
        return e.problems + rewards
    out = backend.check_config(cfg.model) + (rewards or reward_problems(cfg, backend))
    needs = []
    if cfg.grpo.reward_eos:
        needs.append(Ability.END_TOKEN)
    if cfg.lora.image_head != "none":
        needs.append(Ability.IMAGE_HEAD_UPDATE)
    if cfg.data.prompts == "shapes" and (cfg.train.eval_before or cfg.train.eval_after):
        needs.append(Ability.CAPTION)
    out += [msg for msg in (require(backend, a) for a in needs) if msg]
    return out or memory_problems(cfg, backend)


def memory_problems(cfg: Config, backend) -> list[str]:
    """model.memory_budget_gb too small for one row, from the checkpoint's config.json (an automatic budget, 0, is
    only known on the device: checked at the first rollout)."""
    m = cfg.model
    if m.max_rows or not m.memory_budget_gb:
        return []
    import torch

    from gvu.models.rows import config_problems

    try:
        shape = backend.memory_shape(m)
    except (OSError, ValueError, KeyError) as e:
        return [f"model.memory_budget_gb needs the sizes in {m.path}/config.json, which could not be read: {e}"]
    return config_problems(
        shape, m.memory_budget_gb, getattr(torch, m.dtype).itemsize,
        2 if cfg.sampling.cfg_scale > 1 else 1, checkpointing=m.gradient_checkpointing,
        attn_probs=m.attn_implementation == "eager",
    )  # fmt: skip


def engine_problems(cfg: Config, world: int) -> list[str]:
    from gvu.engine import read_deepspeed_json, zero_stage

    out = []
    try:
        ds = read_deepspeed_json(cfg)
    except ConfigError as e:
        out += e.problems
    else:
        if cfg.lora.image_head != "none" and zero_stage(ds) == 3:
            out.append(
                f"lora.image_head={cfg.lora.image_head} trains the output head, which ZeRO-3 partitions: use "
                "train.deepspeed=configs/ds_zero2.json or lora.image_head=none"
            )
    g = cfg.grpo
    if cfg.joint.enabled and cfg.joint.questions_per_step % world:
        out.append(f"joint.questions_per_step={cfg.joint.questions_per_step} must be divisible by the ranks ({world})")
    if cfg.joint.enabled and cfg.joint.captions_per_step % world:
        out.append(f"joint.captions_per_step={cfg.joint.captions_per_step} must be divisible by the ranks ({world})")
    if g.prompts_per_step % world:
        out.append(f"grpo.prompts_per_step={g.prompts_per_step} must be divisible by the number of ranks ({world})")
    else:
        n_local = g.prompts_per_step * g.group_size // world
        micro = g.micro_batch_size or n_local
        if n_local % micro:
            out.append(
                f"grpo.micro_batch_size={micro} must divide the {n_local} sequences each of the {world} ranks trains on"
            )
    return out


def data_problems(cfg: Config) -> list[str]:
    from gvu.data import load_prompt_sets

    try:
        train, evals = load_prompt_sets(cfg.data)
    except ConfigError as e:
        return e.problems
    out = []
    if not train:
        out.append("the training set is empty (data.prompts / data.train_tags)")
    out += metadata_problems(cfg, train) + joint_problems(cfg, train)
    try:
        backend = backend_class(cfg.model.backend)
    except ConfigError:
        return out  # already reported by backend_problems
    texts = list(dict.fromkeys(m["prompt"] for m in train + evals))
    bad = backend.check_prompts(cfg.model, texts)
    if bad:
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        out.append(
            f"{len(bad)} prompts of data.prompts / data.eval_file cannot be read by model.backend="
            f"{cfg.model.backend!r}{more}: " + "; ".join(bad[:MAX_LISTED])
        )
    return out


def metadata_problems(cfg: Config, train: list[dict]) -> list[str]:
    """Rewards that read the GenEval metadata (qa, oracle) need an `include` list on every training prompt."""
    from gvu.rewards import get_reward, reward_names

    names = [e.get("name") for e in cfg.grpo.rewards if isinstance(e, dict)]
    readers = [n for n in names if n in reward_names() and get_reward(n).metadata]
    bare = [m["prompt"] for m in train if not m.get("include")]
    if not readers or not bare:
        return []
    return [
        f"grpo.rewards: {', '.join(readers)} read the prompts' GenEval metadata, but {len(bare)} training prompts have "
        f"no 'include' list (e.g. {bare[0]!r}); give data.prompts GenEval-format lines with include"
    ]


def joint_problems(cfg: Config, train: list[dict]) -> list[str]:
    """Joint RL needs exact answers (the toy world), the adapter in the understanding pass, and prompts to ask about;
    lora.scope=split needs joint RL (nothing else trains its understanding adapter)."""
    if not cfg.joint.enabled:
        if cfg.lora.scope == "split":
            return [
                "lora.scope=split adds an understanding adapter that only joint RL trains, but joint.enabled=false: "
                "it would stay zero and every understanding pass would be the base's, as lora.scope=generation does "
                "without the second adapter; set joint.enabled=true or lora.scope=generation"
            ]
        return []
    out = []
    if cfg.lora.scope == "generation":
        out.append(
            f"joint.enabled trains the understanding through the adapter, but lora.scope={cfg.lora.scope} runs every "
            "understanding pass with the adapter off, so the understanding loss would reach no weight: set "
            "lora.scope=all (one adapter) or lora.scope=split (an adapter per direction)"
        )
    if cfg.model.backend != "toy":
        return out + [
            f"joint.enabled needs questions about images with exact answers; those come from the shapes world "
            f"(gvu/toy/questions.py: rendered scenes and the exact evaluator), which model.backend="
            f"{cfg.model.backend!r} lacks. A real UMM would need a question source with verified answers "
            "(a VQA set with ground truth, or GenEval's detector to read its own generations) and free-text "
            "questions (Ability.QUESTIONS); use model.backend=toy"
        ]
    from gvu.toy.questions import ToyQuestions

    if not ToyQuestions(train, cfg.joint.kinds).kinds:
        out.append(
            f"joint.enabled: no training prompt states a fact of joint.kinds={cfg.joint.kinds} in the shapes world's "
            "grammar (a photo of NP (and NP)* | NP REL NP, with GenEval include metadata); widen data.train_tags or "
            "joint.kinds"
        )
    return out
