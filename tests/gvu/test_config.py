"""Config loading, overrides and the errors that name the field."""

import pytest

from gvu.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("grpo:\n  beta: 0.01\n  group_size: 4\nlora:\n  target_modules: [q_proj, v_proj]\n")
    cfg = load_config(p, ["--grpo.loss_type=dapo", "sampling.temperature=0.7", "--train.eval_before=false"])
    assert cfg.grpo.beta == 0.01 and cfg.grpo.group_size == 4 and cfg.grpo.loss_type == "dapo"
    assert cfg.sampling.temperature == 0.7 and cfg.train.eval_before is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, match",
    [
        ("--grpo.loss_type=ppo", "grpo.loss_type must be one of"),
        ("--grpo.group_size=1", "grpo.group_size must be >= 2"),
        ("--grpo.bogus=1", r"unknown config field\(s\) \['grpo.bogus'\]"),
        ("--sampling.temperature=0", "temperature must be > 0"),
        ("--optim.lr=abc", "optim.lr must be float"),
        ("--grpo.micro_batch_size=7", "must be a multiple of group_size"),
        ("grpo.beta", "must look like"),
    ],
)
def test_bad_values_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")
