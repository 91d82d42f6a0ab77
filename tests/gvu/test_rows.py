"""Rows per forward from a memory budget (gvu/models/rows.py): the arithmetic, the plan's use, the config errors."""

import pytest
import torch

from gvu.config import ConfigError, load_config
from gvu.models.rows import GIB, MemoryShape, RowPlanner, plan_rows, row_bytes

# 2 layers, d=8, MLP 16, 2 query heads, 1 KV head of dim 4, 10 codes; every number below is worked by hand
SHAPE = MemoryShape(
    layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, codes=10, head_width=8, image_tokens=6,
    understanding_tokens=6,
)  # fmt: skip


def test_rollout_bytes_by_hand():
    # S=10 tokens, prefill of 4, 2-byte dtype. KV: 2 (k, v) x 2 layers x 1 head x 4 dims x 10 tokens x 2 = 320.
    # One layer per token: 4 x 8 + 3 x 16 = 80 values. Prefill: 4 x 80 x 2 + 2 heads x 4 x 4 scores x 4 = 768;
    # a decode step: 80 x 2 + 2 heads x 10 scores x 4 + 3 x 10 codes x 4 = 360; the larger counts.
    assert row_bytes(SHAPE, "rollout", 10, 2, prefix_len=4) == {"kv_cache": 320, "activations": 768}
    plan = plan_rows(SHAPE, "rollout", 3000, 10, 2, prefix_len=4)
    assert (plan.per_row, plan.rows) == (1088, 2)  # 3000 // 1088


def test_score_bytes_by_hand():
    # no grad: one layer over 10 tokens 10 x 80 x 2 = 1600 + 2 x 10 x 10 scores x 4 = 800; head 10 x 8 x (2+2+4)
    assert row_bytes(SHAPE, "score", 10, 2) == {"activations": 2400, "head": 640}
    # grad: saved per token per layer (10 x 8 + 4 x 16 + 2 x 1 x 4) x 2 = 304, x 10 tokens x 2 layers = 6080
    assert row_bytes(SHAPE, "score", 10, 2, grad=True) == {"saved_for_backward": 6080, "activations": 2400, "head": 640}
    # eager attention also keeps its probabilities: 2 heads x 10 x 10 x 2 bytes = 400 a layer
    assert row_bytes(SHAPE, "score", 10, 2, grad=True, attn_probs=True)["saved_for_backward"] == 6880
    # checkpointing: each layer's input 2 x 10 x 8 x 2 = 320, plus one layer recomputed 3040
    assert row_bytes(SHAPE, "score", 10, 2, grad=True, checkpointing=True)["saved_for_backward"] == 3360


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
        self.config = type("C", (), {"_attn_implementation": "sdpa"})()


def test_planner_uses_the_budget_logs_once_and_grad_plans_fewer_rows(capsys):
    model = _Tiny()
    planner = RowPlanner(SHAPE, budget_gb=10 * 9120 / GIB)  # ten sequences of scoring with grad
    with torch.no_grad():
        assert planner.chunk("score", 1000, False, model, 10) == 10 * 9120 // 3040
    assert planner.chunk("score", 1000, False, model, 10) == 10
    assert planner.chunk("score", 1000, True, model, 10) == 5  # CFG: 2 sequences a row
    assert planner.chunk("score", 3, False, model, 10) == 3  # never more than the call's rows
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("rows per forward" in x and "model.memory_budget_gb" in x for x in lines)


def test_budget_below_one_row_is_a_config_error_and_explicit_max_rows_wins():
    model = _Tiny()
    with pytest.raises(ConfigError, match=r"model.memory_budget_gb.*one row needs 2"):
        RowPlanner(SHAPE, budget_gb=1000 / GIB).chunk("rollout", 4, True, model, 10, prefix_len=4)
    assert RowPlanner(SHAPE, max_rows=6, budget_gb=1000 / GIB).chunk("rollout", 4, True, model, 10) == 3


def test_automatic_budget_on_cpu_is_a_fraction_of_available_memory():
    from gvu.models.rows import CPU_FRACTION, automatic_budget, mem_available

    budget, how = automatic_budget(torch.device("cpu"))
    assert budget == pytest.approx(CPU_FRACTION * mem_available(), rel=0.05) and "MemAvailable" in how


def test_config_check_refuses_a_budget_too_small_for_one_row_before_loading(tmp_path):
    from gvu import validate
    from gvu.testing import tiny_toy_checkpoint

    ckpt = tiny_toy_checkpoint(tmp_path / "toy")
    base = [f"--model.path={ckpt}", "--train.eval_before=false", "--train.eval_after=false"]
    with pytest.raises(ConfigError, match=r"model.memory_budget_gb.*one row needs"):
        validate.check(load_config(None, [*base, "--model.memory_budget_gb=1e-6"]))
    validate.check(load_config(None, [*base, "--model.memory_budget_gb=1"]))
    validate.check(load_config(None, [*base, "--model.memory_budget_gb=1e-6", "--model.max_rows=4"]))  # max_rows wins


def test_config_check_says_when_the_budget_cannot_be_checked(tmp_path):
    from gvu import validate
    from gvu.testing import tiny_toy_checkpoint

    ckpt = tiny_toy_checkpoint(tmp_path / "toy")
    (tmp_path / "toy" / "config.json").unlink()  # a folder the toy check accepts (tokenizer.json) without sizes
    cfg = load_config(None, [f"--model.path={ckpt}", "--model.memory_budget_gb=1", "--train.eval_before=false"])
    with pytest.raises(ConfigError, match=r"model.memory_budget_gb needs the sizes in .*config.json"):
        validate.check(cfg)
