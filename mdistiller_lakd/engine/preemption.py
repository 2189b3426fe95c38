"""Stopping a run at a step boundary: on a signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2: what Slurm,
submitit and a terminal send before they kill), and mid-epoch checkpoints on a clock
(``SOLVER.CHECKPOINT_MINUTES``).

The handlers only set a flag: nothing runs inside them, so a second signal while a checkpoint is
being written cannot interrupt the write. The trainer asks ``StopSignals.decide`` after every step;
under torchrun the ranks' answers are combined (all-reduce, max) so that every rank checkpoints and
stops at the same step. A stopped run raises ``TrainingStopped``; tools/train.py then exits with
``REQUEUE_EXIT_STATUS``, which the grid's executors read as "requeue me", not "failed".
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable

import torch
import torch.distributed as dist

from . import distributed

# sysexits.h's EX_TEMPFAIL ("a temporary failure; the user is invited to retry"): the run stopped
# on a signal after writing its `latest`, and resuming it continues where it stopped.
REQUEUE_EXIT_STATUS = 75
# Those this platform has (Windows lacks SIGUSR1 and SIGUSR2).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)

# What ``decide`` answers, ordered so that the maximum over the ranks is what they all do.
CONTINUE, CHECKPOINT, STOP = 0, 1, 2


class TrainingStopped(Exception):
    """The run stopped on a signal at a step boundary; its `latest` holds where it stopped."""


class StopSignals:
    """The stop flag the signal handlers set, and the clock of ``SOLVER.CHECKPOINT_MINUTES``.

    Use as a context manager around the training loop: the handlers are installed on entry (in the
    main thread only: Python's handlers live there) and the previous ones restored on exit.
    ``clock`` gives the time in seconds.
    """

    def __init__(self, checkpoint_minutes: float, device: torch.device, clock: Callable[[], float]) -> None:
        self.interval = checkpoint_minutes * 60.0  # seconds; 0 = no clock checkpoints
        self.device = device
        self.clock = clock
        self.signal_name: str | None = None  # the first stop signal received
        self.last_checkpoint: float | None = None  # clock time of the last checkpoint (or of the start)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        self.last_checkpoint = self.clock()
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        # Only a flag: this may run in the middle of any Python code, a checkpoint write included.
        if self.signal_name is None:
            self.signal_name = signal.Signals(number).name

    def decide(self) -> int:
        """At a step (or epoch) boundary: ``STOP`` after a signal (on any rank), ``CHECKPOINT`` when
        ``SOLVER.CHECKPOINT_MINUTES`` have passed since the last checkpoint (on any rank's clock),
        else ``CONTINUE``; the same answer on every rank."""
        now = self.clock()
        if self.last_checkpoint is None:  # outside the context manager (a lone training pass)
            self.last_checkpoint = now
        wanted = CONTINUE
        if self.signal_name is not None:
            wanted = STOP
        elif self.interval > 0 and now - self.last_checkpoint >= self.interval:
            wanted = CHECKPOINT
        if distributed.is_distributed():
            agreed = torch.tensor([wanted], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            wanted = int(agreed.item())
            if wanted == STOP and self.signal_name is None:
                self.signal_name = "a signal to another rank"
        return wanted

    def checkpointed(self) -> None:
        """A checkpoint was just written: the clock counts from now."""
        self.last_checkpoint = self.clock()
