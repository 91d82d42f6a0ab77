"""What a run trains with: the process group, the peft policy on a backend's model, the DeepSpeed engine over it
and its learning-rate schedule. Everything here assumes a configuration that passed gvu.validate.check."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import torch

from gvu.config import Config, ConfigError, resolve_path
from gvu.models import Ability, add_understanding_adapter, backbone_and_head


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Works under the deepspeed launcher and as a plain single process (gloo on CPU)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python gvu/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def read_deepspeed_json(cfg: Config) -> dict:
    """train.deepspeed as a dict; ConfigError naming the file (and line) when it is missing or not JSON."""
    path = resolve_path(cfg.train.deepspeed)
    if not path.exists():
        raise ConfigError(f"train.deepspeed={cfg.train.deepspeed!r}: file not found (e.g. configs/ds_zero2.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON with every "auto" filled from our config (batch sizes, optimizer, precision)."""
    ds = read_deepspeed_json(cfg)
    n_local = cfg.grpo.prompts_per_step * cfg.grpo.group_size // world
    micro = cfg.grpo.micro_batch_size or n_local
    auto = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": n_local // micro,
        "train_batch_size": n_local * world,
        "gradient_clipping": cfg.optim.max_grad_norm,
    }
    for k, v in auto.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    for key, want in (("bf16", "bfloat16"), ("fp16", "float16")):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = cfg.model.dtype == want
    opt = ds.get("optimizer", {}).get("params", {})
    for k, v in (("lr", cfg.optim.lr), ("betas", list(cfg.optim.betas)), ("weight_decay", cfg.optim.weight_decay)):
        if opt.get(k) == "auto":
            opt[k] = v
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build(cfg: Config):
    """(backend, peft policy model) for a run: the backend's model from cfg.model with build_policy's adapter."""
    from gvu.models import load_umm

    backend, model = load_umm(cfg.model)
    return backend, build_policy(cfg, backend, model)


def build_policy(cfg: Config, backend, model):
    """The peft model: a fresh LoRA adapter on `model` (and the backend's trained head update when configured)."""
    from peft import LoraConfig, get_peft_model

    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    names = list(cfg.lora.target_modules)
    lcfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        # a backend may narrow the names to its language model (Janus: not SigLIP's q/k/v_proj, not the VQ)
        target_modules=backend.lora_targets(names) if Ability.LORA_NARROWING in backend.abilities else names,
        bias="none",
    )
    try:
        model = get_peft_model(model, lcfg)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules={names}: {e}") from None
    _, head = backbone_and_head(model)
    if any(p.requires_grad for p in head.parameters()):
        # log-probs apply head.weight directly (kernels.linear_token_logprobs), which a LoRA delta never reaches
        raise ConfigError(
            f"lora.target_modules={names} adapts the output head, whose weight the log-prob kernels read directly, "
            "so the adapter would be silently ignored; adapt the decoder's layers only"
        )
    if cfg.lora.scope == "split":  # the understanding's own adapter, same shape (gvu.models.understanding_passes)
        add_understanding_adapter(model, lcfg)
    if cfg.lora.image_head == "factorised":
        backend.add_image_head_update(model)
    return model


def announce_op_build(say) -> None:
    """DeepSpeed JIT-builds its CPU ops (fused_adam, shm_comm) on a machine's first start, silently, ~1 min."""
    if torch.cuda.is_available():
        return
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    if not any(root.glob("*/fused_adam/*.so")):
        say(f"first start on this machine: DeepSpeed builds its CPU ops into {root} (about a minute, once) ...")
        sys.stdout.flush()


def make_engine(model, cfg: Config, world: int):
    """DeepSpeed engine over the peft model, optimising only the trainable parameters."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    # the scheduler is stepped by engine.step() at each optimizer step and saved in DeepSpeed's checkpoints
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    return engine


def lr_lambda(cfg: Config):
    """Multiplier of optim.lr at a step: linear warmup over optim.warmup_steps, then constant or a cosine down to
    optim.min_lr_ratio at train.steps."""
    w, n, lo = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def at(step: int) -> float:
        if step < w:
            return (step + 1) / w
        if cfg.optim.schedule == "constant":
            return 1.0
        t = min(1.0, (step - w) / max(1, n - w))
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))

    return at
