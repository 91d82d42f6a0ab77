"""The main job as a user runs it: `deepspeed gvu/train.py` on the shipped toy UMM.

The short version (CI) checks that every promised output is written; the full version (slow) checks the
result: held-out generation up >= 50% relative with understanding not worse.
"""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def launch(args, cwd, num_gpus=1, timeout=1800):
    if shutil.which("deepspeed") is None:
        pytest.fail("the `deepspeed` launcher is not on PATH: `pip install deepspeed` (scripts/setup.sh does)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with socket.socket() as sock:  # a free port: 29500 may be taken by another job on the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = ["deepspeed", "--num_gpus", str(num_gpus), "--master_port", str(port), str(REPO / "gvu" / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def check_run_folder(run: Path):
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "samples_before.png",
        "samples_after.png",
        "curves.png",
        "results.json",
    ):
        assert (run / name).is_file(), f"missing {name}"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "latest").is_file()
    return json.loads((run / "results.json").read_text())


@pytest.mark.parametrize("ranks", [1, 2])
def test_main_job_short(tmp_path, ranks):
    """A few steps of the default job with a small evaluation, on one and on two CPU ranks."""
    proc = launch(
        [
            "--train.steps=3",
            "--grpo.prompts_per_step=4",
            "--data.eval_prompts=11",
            "--train.eval_samples=2",
            "--train.log_every=1",
            f"--train.output_dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        num_gpus=ranks,
    )
    res = check_run_folder(tmp_path / "run")
    assert res["steps"] == 3
    for when in ("before", "after"):
        assert res[when]["generation"]["n_prompts"] == 11
        assert 0.0 <= res[when]["generation"]["overall"] <= 1.0
    assert "| overall" in proc.stdout and "step    3/3" in proc.stdout


@pytest.mark.slow
def test_main_job_full_improves_generation_and_keeps_understanding(tmp_path):
    """The default job exactly as the README runs it (target: >= +50% relative, understanding not worse).

    Measured: +73% (this exact run, 0.234 -> 0.404, docs/results/toy-default-rollout-loop); before the shared decode
    loop +79% (0.418), +76% and +89% (seeds 1, 2) with the factorised image-head update;
    +53% to +57% without it; +40% to +49% with the earlier constant lr (README "Results"). ~6 min on 2 cores."""
    launch([f"--train.output_dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=3600)
    res = check_run_folder(tmp_path / "run")
    b, a = res["before"], res["after"]
    assert a["generation"]["overall"] >= 1.5 * b["generation"]["overall"], (b["generation"], a["generation"])
    assert a["understanding"]["caption_acc"] >= b["understanding"]["caption_acc"] - 0.02
    assert res["minutes"] <= 12
