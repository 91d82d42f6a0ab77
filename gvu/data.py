"""Prompt sets (GenEval-format metadata dicts) and the deterministic per-step prompt sampler."""

from __future__ import annotations

import json
import random
from pathlib import Path

from gvu.config import ConfigError, DataConfig, resolve_path


def read_jsonl_lines(path: Path, field: str = "data.prompts") -> list[tuple[str, dict]]:
    """(raw line, parsed dict) per non-empty line of GenEval-format metadata; every bad line is reported at once
    (ConfigError naming the file and line; `field` names the config field that points to the file)."""
    if not path.is_file():
        raise ConfigError(f"{field}={str(path)!r}: file not found; give a GenEval-format .jsonl")
    rows, problems = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one metadata object")
            continue
        if not isinstance(m, dict) or not isinstance(m.get("prompt"), str):
            problems.append(f"{path}:{i}: each line needs a string field 'prompt' (GenEval metadata format)")
            continue
        rows.append((line.strip(), m))
    if not rows and not problems:
        problems.append(f"{path}: no prompts found")
    if len(problems) > 20:
        problems = problems[:20] + [f"{path}: ... and {len(problems) - 20} more bad lines"]
    if problems:
        raise ConfigError(problems)
    return rows


def read_jsonl(path: Path, field: str = "data.prompts") -> list[dict]:
    """GenEval-format metadata: one JSON object per line with at least `prompt` (and `tag` for per-tag scores)."""
    metas = [m for _, m in read_jsonl_lines(path, field)]
    for m in metas:
        m.setdefault("tag", "all")
    return metas


def load_prompt_sets(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out eval) metadata lists. "shapes" generates the toy world's disjoint sets from `cfg.seed`."""
    if cfg.prompts == "shapes":
        from gvu.toy import prompts as WP

        train, evals = WP.make_prompt_sets(cfg.seed)
    else:
        problems: list[str] = []

        def read(field: str, value: str) -> list[dict]:
            try:
                return read_jsonl(resolve_path(value), field) if value else []
            except ConfigError as e:
                problems.extend(e.problems)
                return []

        train, evals = read("data.prompts", cfg.prompts), read("data.eval_file", cfg.eval_file)
        if not cfg.prompts:
            problems.append("data.prompts is empty; give 'shapes' or a GenEval-format .jsonl")
        if problems:
            raise ConfigError(problems)
    if cfg.train_tags:
        known = sorted({m.get("tag", "all") for m in train})
        unknown = sorted(set(cfg.train_tags) - set(known))
        if unknown:
            raise ConfigError(f"data.train_tags has unknown tags {unknown}; the training set has {known}")
        train = [m for m in train if m.get("tag", "all") in cfg.train_tags]
    if cfg.eval_prompts:  # an even spread over the set, so every tag stays represented
        evals = evals[:: max(1, len(evals) // cfg.eval_prompts)][: cfg.eval_prompts]
    return train, evals


class PromptSampler:
    """Which prompts a rank trains on at a step: epochs of seeded shuffles, so a resumed run draws the same."""

    def __init__(
        self, metas: list[dict], per_step: int, seed: int, rank: int = 0, world: int = 1, balance_tags: bool = False
    ):
        if per_step % world:
            raise ConfigError(f"grpo.prompts_per_step={per_step} must be divisible by the number of ranks ({world})")
        self.metas, self.per_step, self.seed, self.rank, self.world = metas, per_step, seed, rank, world
        self._orders: dict[int, list[int]] = {}
        self.by_tag: dict[str, list[dict]] = {}
        if balance_tags:
            for m in metas:
                self.by_tag.setdefault(m.get("tag", "all"), []).append(m)

    def _order(self, epoch: int) -> list[int]:
        if epoch in self._orders:
            return self._orders[epoch]
        idx = list(range(len(self.metas)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
        self._orders = {epoch: idx}
        return idx

    def batch(self, step: int) -> list[dict]:
        """The prompts of this rank at `step` (global batch sliced by rank)."""
        n = len(self.metas)
        start = step * self.per_step
        out = []
        if self.by_tag:  # tag j mod T, then a seeded draw within the tag: depends only on (seed, step)
            tags = sorted(self.by_tag)
            rng = random.Random(self.seed * 1_000_003 + step)
            for j in range(start, start + self.per_step):
                out.append(rng.choice(self.by_tag[tags[j % len(tags)]]))
        else:
            for j in range(start, start + self.per_step):
                epoch, pos = divmod(j, n)
                out.append(self.metas[self._order(epoch)[pos]])
        k = self.per_step // self.world
        return out[self.rank * k : (self.rank + 1) * k]
