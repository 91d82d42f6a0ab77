"""Prompt sets and the per-step prompt sampler."""

import json
from collections import Counter

import pytest

from gvu.config import ConfigError, DataConfig
from gvu.data import PromptSampler, load_prompt_sets, read_jsonl


def test_sampler_is_a_function_of_the_step_and_ranks_split_the_global_batch():
    metas = [{"prompt": f"p{i}", "tag": "t"} for i in range(37)]
    s = PromptSampler(metas, 8, seed=3)
    assert s.batch(5) == PromptSampler(metas, 8, seed=3).batch(5)  # a resumed run draws the same prompts
    r0, r1 = PromptSampler(metas, 8, 3, rank=0, world=2), PromptSampler(metas, 8, 3, rank=1, world=2)
    assert r0.batch(5) + r1.batch(5) == s.batch(5)
    # an epoch visits every prompt once
    seen = [m["prompt"] for step in range(0, 37 * 8 // 8) for m in s.batch(step)][:37]
    assert len(set(seen)) == 37


def test_balanced_sampler_gives_every_tag_the_same_share():
    train, _ = load_prompt_sets(DataConfig())
    s = PromptSampler(train, 16, seed=0, balance_tags=True)
    counts = Counter(m["tag"] for step in range(33) for m in s.batch(step))
    assert len(counts) == 11 and max(counts.values()) - min(counts.values()) <= 1
    assert s.batch(7) == PromptSampler(train, 16, seed=0, balance_tags=True).batch(7)


def test_uneven_batch_across_ranks_is_refused():
    with pytest.raises(ConfigError, match="divisible by the number of ranks"):
        PromptSampler([{"prompt": "a"}], 3, 0, rank=0, world=2)


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"prompt": "a photo of a cat", "tag": "single_object"}) + "\n{oops\n")
    with pytest.raises(ConfigError, match=r"m.jsonl:2: not valid JSON"):
        read_jsonl(p)
    p.write_text(json.dumps({"tag": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"m.jsonl:1: each line needs a string field 'prompt'"):
        read_jsonl(p)


def test_shapes_sets_are_disjoint():
    train, evals = load_prompt_sets(DataConfig())
    assert not {m["prompt"] for m in train} & {m["prompt"] for m in evals}


def test_train_tags_filter_and_unknown_tag_error():
    train, evals = load_prompt_sets(DataConfig(train_tags=["colors", "counting"]))
    assert {m["tag"] for m in train} == {"colors", "counting"} and len({m["tag"] for m in evals}) == 11
    with pytest.raises(ConfigError, match=r"data.train_tags has unknown tags \['colour'\]"):
        load_prompt_sets(DataConfig(train_tags=["colour"]))
