"""The local executor: a queue of cells over the visible GPUs, one run per GPU at a time (one at a
time on the CPU when there is no GPU), with a progress line after every start and finish. A cell
that stopped on a signal (exit status ``REQUEUE_EXIT_STATUS``) goes back to the front of the queue."""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

from ..engine.cfg import ConfigError
from ..engine.preemption import REQUEUE_EXIT_STATUS
from .cells import RUNNING, SKIP, Cell, CellRun, cell_state, last_log_line

POLL_SECONDS = 0.5


def visible_gpus(count: int | None = None) -> list[str]:
    """The ids to put in each child's CUDA_VISIBLE_DEVICES: the visible GPUs (the first ``count``)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [item.strip() for item in listed.split(",") if item.strip()]
    else:
        import torch

        ids = [str(index) for index in range(torch.cuda.device_count())]
    if count is None:
        return ids
    if count > len(ids):
        raise ConfigError(f"--gpus {count}: only {len(ids)} GPU(s) visible")
    return ids[:count]


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class _Running:
    run: CellRun
    started: float


class LocalQueue:
    """Runs the cells that are neither finished nor running in another process (their folder's lock
    is held); ``run()`` returns the exit status of each cell it ran."""

    def __init__(self, cells: list[Cell], gpus: list[str], out: TextIO | None = None):
        self.total = len(cells)
        actions = [cell_state(cell).action for cell in cells]
        self.pending = deque(cell for cell, action in zip(cells, actions) if action not in (SKIP, RUNNING))
        self.elsewhere = actions.count(RUNNING)
        self.done = actions.count(SKIP)
        # A slot per GPU id; on the CPU one slot, with CUDA hidden (`--gpus 0` on a GPU machine).
        self.slots: list[str] = gpus or [""]
        self.device_names = {slot: f"GPU {slot}" if slot else "CPU" for slot in self.slots}
        self.running: dict[str, _Running] = {}
        self.durations: list[float] = []
        self.statuses: dict[str, int] = {}
        self.out = out  # None: sys.stdout at the time of printing
        self.start = time.monotonic()

    def run(self) -> dict[str, int]:
        running = f", {self.elsewhere} running in another process (left to it)" if self.elsewhere else ""
        self._print(f"{self.done} of {self.total} cells finished already{running}; running the other {len(self.pending)}")
        try:
            while self.pending or self.running:
                for slot in self.slots:
                    if slot not in self.running and self.pending:
                        self._launch(slot, self.pending.popleft())
                time.sleep(POLL_SECONDS)
                for slot, job in list(self.running.items()):
                    if job.run.poll() is not None:
                        self._finish(slot, job)
        except KeyboardInterrupt:
            for job in self.running.values():
                job.run.terminate()
            self._print("interrupted; run the same command again to continue (killed runs resume from `latest`)")
            raise
        return self.statuses

    def _launch(self, slot: str, cell: Cell) -> None:
        state = cell_state(cell)
        if state.action == RUNNING:  # started by another process since the queue was made
            self.elsewhere += 1
            self._print(f"left {cell.name} to the process running it ({state.detail})")
            return
        action = state.action
        self.running[slot] = _Running(CellRun(cell, {"CUDA_VISIBLE_DEVICES": slot}), time.monotonic())
        self._print(f"{action} {cell.name} on {self.device_names[slot]}")

    def _finish(self, slot: str, job: _Running) -> None:
        del self.running[slot]
        status, cell = job.run.wait(), job.run.cell
        if status == REQUEUE_EXIT_STATUS:  # stopped by a signal, its `latest` written where it stopped
            self.pending.appendleft(cell)
            self._print(f"stopped {cell.name} by a signal; restarting it from its `latest`")
            return
        self.statuses[cell.name] = status
        self.done += 1
        elapsed = time.monotonic() - job.started
        self.durations.append(elapsed)
        if status:
            self._print(f"FAILED {cell.name} (exit status {status}): {last_log_line(cell)}")
        else:
            self._print(f"finished {cell.name} in {_clock(elapsed)}")

    def progress(self) -> str:
        """Cells done / running / left, elapsed time and an estimate of the time left."""
        left = len(self.pending)
        elapsed = time.monotonic() - self.start
        if self.durations and (left or self.running):
            # Mean time of the cells run so far, spread over the slots (resumed cells make it rough).
            mean = sum(self.durations) / len(self.durations)
            estimate = f"about {_clock(mean * (left + len(self.running)) / len(self.slots))} left"
        else:
            estimate = "estimate after the first cell" if left or self.running else "all done"
        elsewhere = f", {self.elsewhere} running elsewhere" if self.elsewhere else ""
        return (f"{self.done}/{self.total} done, {len(self.running)} running{elsewhere}, {left} left | "
                f"elapsed {_clock(elapsed)} | {estimate}")

    def _print(self, event: str) -> None:
        print(f"[grid] {event}\n[grid] {self.progress()}", file=self.out or sys.stdout, flush=True)
