"""Smoke tests of the GvU benches (rollout, reward, step) with --quick: rows are written, equality checks pass.
Rollout and reward run on the toy UMM and on a tiny random Janus (--model toy / --model janus)."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"gvu_bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()  # the benches set 1 thread; later tests in this process keep their own setting
    yield
    torch.set_num_threads(n)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("model", ["toy", "janus"])
def test_rollout_bench_quick(tmp_path, model):
    out = tmp_path / "rollout.csv"
    rows = load_bench("rollout").run(["--quick", "--model", model, "--out", str(out)])  # asserts greedy equality
    got = read(out)
    assert len(got) == len(rows) == 2 and {r["impl"] for r in got} == {"ours", "hf_generate"}
    assert all(r["greedy_equal"] == "True" and float(r["images_per_s"]) > 0 for r in got)
    assert all(r["cpu"] and r["torch"] and r["git_sha"] and r["loadavg"] for r in got)
    assert all(r["model"].startswith("janus_tiny") == (model == "janus") for r in got)


@pytest.mark.parametrize("model", ["toy", "janus"])
def test_reward_bench_quick(tmp_path, model):
    out = tmp_path / "reward.csv"
    load_bench("reward").run(["--quick", "--model", model, "--out", str(out)])  # asserts the three rewards agree
    got = read(out)
    assert len(got) == 4 and {r["impl"] for r in got} == {"ours", "eager_full", "official", "body_forward"}
    assert all(float(r["max_rel_diff_vs_ours"]) < 1e-4 and float(r["ms_per_image"]) > 0 for r in got)
    floor = next(r for r in got if r["impl"] == "body_forward")
    assert float(floor["vs_body_forward"]) == 1.0 and float(floor["extra_mib_vs_body"]) == 0.0
    assert all(r["model"].startswith("janus_tiny") == (model == "janus") for r in got)


def test_janus_rows_keep_the_existing_csv_header(tmp_path):
    """Janus rows go into the same columns (model name in `model`): an old CSV keeps its header and rows."""
    out = tmp_path / "reward.csv"
    bench = load_bench("reward")
    bench.run(["--quick", "--model", "toy", "--out", str(out)])
    header = out.read_text().splitlines()[0]
    bench.run(["--quick", "--model", "janus", "--sizes", "2", "--out", str(out)])
    assert out.read_text().splitlines()[0] == header
    assert [r["model"].startswith("janus_tiny") for r in read(out)] == [False] * 4 + [True] * 4


def test_step_bench_quick(tmp_path):
    out = tmp_path / "step.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a world of one in its own process (DeepSpeed state stays out of pytest)
    p = subprocess.run(
        [sys.executable, str(REPO / "bench" / "step.py"), "--quick", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    got = {r["phase"]: r for r in read(out)}
    assert {"rollout", "reward", "backward", "total"} <= set(got)
    assert float(got["total"]["seconds"]) > 0
    assert abs(sum(float(got[k]["share"]) for k in got if k != "total") - 1) < 1e-6
    assert float(got["reward"]["baseline_seconds"]) > 0


def test_rollout_profile_asks_for_the_real_layout():
    """--profile measures Janus-Pro's layout only: without --shapes it is a usage error naming the flag to add."""
    with pytest.raises(SystemExit):
        load_bench("rollout").run(["--profile"])
