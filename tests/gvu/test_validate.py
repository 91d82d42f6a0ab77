"""The one configuration check (gvu/validate.py): every problem at once, before anything starts."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gvu import validate
from gvu.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def problems(overrides, world=1) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate.check(load_config(None, overrides), world)
    return e.value.problems


def test_the_default_config_passes():
    validate.check(load_config(REPO / "configs" / "toy.yaml"))


def test_prompt_files_lines_vocabulary_and_paths_are_all_reported(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle", "tag": "x"}\nnot json\n{"tag": "t"}\n{"prompt": "a red unicorn"}\n')
    got = problems(
        [
            f"--data.prompts={prompts}",
            f"--data.eval_file={tmp_path / 'missing.jsonl'}",
            f"--model.path={tmp_path / 'no_model'}",
            f"--train.deepspeed={tmp_path / 'ds.json'}",
        ]
    )
    text = "\n".join(got)
    assert f"{prompts}:2: not valid JSON" in text and f"{prompts}:3: each line needs a string field 'prompt'" in text
    assert "data.eval_file=" in text and "file not found" in text
    assert "model.path=" in text and "train.deepspeed=" in text
    # the vocabulary check needs readable lines; once the lines are fixed it names the unknown word
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a red unicorn"}\n')
    (got,) = problems([f"--data.prompts={prompts}"])
    assert "unicorn" in got and "toy vocabulary" in got


def test_cross_field_checks():
    got = problems(["--grpo.prompts_per_step=3"], world=2)
    assert any("divisible by the number of ranks (2)" in m for m in got)
    got = problems(["--grpo.prompts_per_step=4", "--grpo.group_size=4", "--grpo.micro_batch_size=16"], world=2)
    assert any("must divide the 8 sequences" in m for m in got)
    got = problems(["--data.train_tags=[nope]"])
    assert any("data.train_tags has unknown tags ['nope']" in m for m in got)
    got = problems(["--model.backend=mystery"])
    assert any("known: ['janus', 'toy'" in m or "known: [" in m for m in got)


def test_cli_exits_2_at_once_without_a_traceback_or_a_run_folder(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a photo of a dragon"}\n')
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(REPO / "gvu" / "train.py"), f"--data.prompts={prompts}", f"--train.output_dir={out}",
         f"--model.path={tmp_path / 'none'}", "--grpo.reward_eos=true", "--model.backend=janus", "--grpo.bta=1"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("config error:") and "Traceback" not in proc.stderr
    assert "model.path=" in proc.stderr and "end_token" in proc.stderr and "'janus'" in proc.stderr
    assert "did you mean grpo.beta" in proc.stderr  # a load-time problem and the check's, reported together
    assert not out.exists() and time.time() - t0 < 30
