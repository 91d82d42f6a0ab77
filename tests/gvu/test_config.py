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
        ("--grpo.bogus=1", "unknown config field grpo.bogus; known in grpo."),
        ("--grpo.bta=1", "unknown config field grpo.bta; did you mean grpo.beta"),
        ("--lora.target_modules=[q_proj,lm_head]", "names lm_head"),
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


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--grpo.loss_type=ppo", "--optim.lr=-1", "--train.bogus=1", "--sampling.top_p=2"])
    text = str(e.value)
    assert len(e.value.problems) == 4 and text.startswith("4 problems")
    for part in ("grpo.loss_type", "optim.lr", "train.bogus", "sampling.top_p"):
        assert part in text


def test_every_field_has_help_and_the_cli_lists_them():
    import subprocess
    import sys
    from pathlib import Path

    from gvu.config import field_help

    rows = [(s, f, h) for s, fields in field_help() for f, _, _, h in fields]
    assert len(rows) > 40 and all(h.strip() for _, _, h in rows), [r for r in rows if not r[2].strip()]
    train = Path(__file__).resolve().parents[2] / "gvu" / "train.py"
    out = subprocess.run([sys.executable, str(train), "--help"], capture_output=True, text=True).stdout
    for s, f, _ in rows:
        assert f"--{s}.{f}" in out, f"{s}.{f} missing from --help"
    assert "lora.enabled" not in out
