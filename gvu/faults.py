"""Fault injection for the reliability tests (tests/gvu/test_faults.py, docs/reliability.md).

GVU_FAULT=[hang:]<where>@<step>[@<rank>] makes the process SIGKILL itself (or, with `hang:`, stall for 120 s) when it
reaches <where> in step <step> (1-based): a phase of the step (rollout, decode, reward, ref_logprobs,
policy_logprobs, backward, optimizer) or `save` (after the checkpoint's files are written, before `latest` names
them). Unset, `point` does nothing.
"""

from __future__ import annotations

import os
import signal
import time

_SPEC = os.environ.get("GVU_FAULT", "")


def point(where: str, step: int) -> None:
    """Kill this process here if GVU_FAULT names (`where`, `step`, and this rank when given)."""
    if not _SPEC:
        return
    action, _, spec = _SPEC.rpartition(":")
    parts = spec.split("@")
    rank_ok = len(parts) < 3 or parts[2] == os.environ.get("RANK", "0")
    if parts[0] == where and int(parts[1]) == step and rank_ok:
        if action == "hang":
            time.sleep(120)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
