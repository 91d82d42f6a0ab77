"""Drop-in for TRL users: TRL 1.16's GRPOTrainer computes its per-token log-probs (and entropies) with our kernels.

    from kernels.integrations.trl import patch_trl_grpo
    patch_trl_grpo()      # before GRPOTrainer(...).train(); unpatch_trl_grpo() restores TRL's own function

TRL scores completions through `add_fused_lm_head` (trl/trainer/utils.py): the patched model forward projects the
hidden states of the labelled positions through the LM head with `_ChunkedLogProbFunction.apply(hidden, weight,
bias, labels, temperature, chunk_size, softcap, logit_scale, outputs)` -> (log_probs, entropy, log_sum_sq_probs,
mean_logits, is_top1). The patch swaps that one function for `kernels.linear_token_logprobs` (C++ on CPU, Triton
on CUDA) whenever the call needs only log_probs / entropy without softcapping or a logit scale, and hands every
other call to TRL's own. The same function serves TRL's RLOO, KTO and SFT trainers, which are patched with it.
"""

from __future__ import annotations

import kernels

_state: dict = {"original": None, "calls": 0, "fallbacks": 0}


class _KernelLogProbs:
    """Stands in for trl.trainer.utils._ChunkedLogProbFunction (only its `apply` is used)."""

    @staticmethod
    def apply(hidden, weight, bias, labels, temperature, chunk_size, softcap, logit_scale, outputs):
        if softcap is not None or logit_scale != 1.0 or not set(outputs) <= {"log_probs", "entropy"}:
            _state["fallbacks"] += 1
            return _state["original"].apply(
                hidden, weight, bias, labels, temperature, chunk_size, softcap, logit_scale, outputs
            )
        _state["calls"] += 1
        with_ent = "entropy" in outputs
        res = kernels.linear_token_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=with_ent
        )
        logp, ent = res if with_ent else (res, None)
        return logp, ent, None, None, None


def patch_trl_grpo() -> None:
    """Route TRL's fused-LM-head log-probs through kernels.linear_token_logprobs (idempotent)."""
    import trl
    from trl.trainer import utils

    if not hasattr(utils, "_ChunkedLogProbFunction"):
        raise RuntimeError(
            f"trl {trl.__version__} has no trl.trainer.utils._ChunkedLogProbFunction to patch (written for 1.16)"
        )
    if utils._ChunkedLogProbFunction is not _KernelLogProbs:
        _state["original"] = utils._ChunkedLogProbFunction
        utils._ChunkedLogProbFunction = _KernelLogProbs


def unpatch_trl_grpo() -> None:
    """Restore TRL's own function."""
    from trl.trainer import utils

    if _state["original"] is not None:
        utils._ChunkedLogProbFunction = _state["original"]
        _state["original"] = None


def stats() -> dict:
    """How many calls our kernels served and how many went back to TRL's function (tests, logs)."""
    return {"calls": _state["calls"], "fallbacks": _state["fallbacks"]}
