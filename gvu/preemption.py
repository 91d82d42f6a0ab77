"""Preemption: SIGTERM, SIGINT, SIGUSR1 (SLURM's --signal) and SIGHUP ask the run to stop at the end of its current
step; every rank then writes the checkpoint and exits with EXIT_PREEMPTED. A second signal, more than
SAME_EVENT_S after the first, exits at once; signals that arrive together count once (Ctrl-C reaches the launcher
and the ranks, and the launcher forwards it again; a cluster signals every process of the job).

The deepspeed launcher forwards SIGTERM/SIGINT to every rank, waits 30 s, kills what is left, and itself exits 1:
the ranks' own exit code (EXIT_PREEMPTED) and their log line say that the checkpoint was written. Steps longer than
30 s need the signal sent to the ranks earlier (e.g. SLURM `--signal=USR1@120`)."""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the checkpoint is written; rerun the same command to resume
EXIT_CANNOT_RESUME = 3  # checkpoints exist and none loads (gvu.checkpoint.ResumeError)
EXIT_FOLDER_LOCKED = 4  # another trainer holds train.output_dir
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written (gvu.checkpoint.SaveError); the previous one is intact
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
SAME_EVENT_S = 2.0


class StopFlag:
    """Set by the first signal; `agreed(world)` makes every rank stop at the same step."""

    def __init__(self):
        self.signum: int | None = None
        self.at = 0.0
        for s in SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            if time.monotonic() - self.at < SAME_EVENT_S:
                return  # the same event, delivered again (launcher forwarding, process-group signals)
            print(f"gvu: second signal ({signal.Signals(signum).name}): exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum, self.at = signum, time.monotonic()
        print(
            f"gvu: {signal.Signals(signum).name} received: finishing this step, then checkpoint and exit "
            f"{EXIT_PREEMPTED} (a second signal exits at once)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, world: int) -> bool:
        """True on every rank when any rank was signalled (one tiny all-reduce per step with several ranks)."""
        mine = self.signum is not None
        if world == 1:
            return mine
        t = torch.tensor([int(mine)], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())
