"""The Slurm executor: one job per cell, submitted as a job array with submitit (the ``slurm``
extra). Before its time limit or on preemption submitit's signal stops the training at a step
boundary with a mid-epoch ``latest`` (``CellJob.checkpoint``) and requeues the job, which runs the
cell again from there (docs/preemption.md); ``cluster="local"`` or ``"debug"`` runs the same jobs without
Slurm (submitit's local and in-process executors)."""
from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass, field

import submitit

from ..engine.cfg import ConfigError
from .cells import RUNNING, SKIP, Cell, CellRun, cell_state

SUBMITIT_FOLDER = "submitit"  # under the grid's output: job scripts, pickles and Slurm's logs


class SlurmUnavailableError(RuntimeError):
    """No Slurm on this machine (submitit finds no srun)."""


class CellJob(submitit.helpers.Checkpointable):
    """A cell as a job. Checkpointable: on preemption or timeout submitit calls ``checkpoint``, then
    requeues this same object, and calling it again resumes the run (the state is read from the run
    folder at each start)."""

    def __init__(self, cell: Cell, gpus: int = 1):
        self.cell = cell
        self.gpus = gpus
        self.run: CellRun | None = None  # the training while it runs

    def __getstate__(self) -> dict:
        return {"cell": self.cell, "gpus": self.gpus, "run": None}  # a running process is not pickled

    def __call__(self) -> int:
        """Train the cell unless it is finished or another process runs it (a job of an earlier
        submission, a requeued job racing a slow node); returns train.py's exit status (0: finished
        or left to that process)."""
        state = cell_state(self.cell)
        if state.action == RUNNING:
            print(f"[grid] {self.cell.name} is running in another process ({state.detail}); nothing started")
        if state.action in (SKIP, RUNNING):
            return 0
        # Slurm sets CUDA_VISIBLE_DEVICES to the job's GPUs; the child inherits it.
        self.run = CellRun(self.cell, gpus=self.gpus)
        return self.run.wait()

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's signal handler before it requeues the job: the training gets
        SIGTERM (a no-op if Slurm signalled it already), writes its mid-epoch `latest` at the next
        step boundary and exits; only then is the job requeued, to resume there."""
        if self.run is not None and self.run.process.returncode is None:
            self.run.process.send_signal(signal.SIGTERM)
            try:
                # Not Popen.wait: this handler may have interrupted it, which holds its lock.
                os.waitid(os.P_PID, self.run.process.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:  # reaped already
                pass
        return super().checkpoint(*args, **kwargs)


@dataclass
class SlurmOptions:
    partition: str | None = None
    time: str = "24:00:00"  # minutes, H:MM:SS or D-HH:MM:SS
    gpus: int = 1  # per cell; more than one runs train.py under torchrun
    cpus: int = 4  # per cell
    mem_gb: float | None = None
    constraint: str | None = None
    array_parallelism: int | None = None  # at most this many cells at once
    requeues: int = 3  # how many times a timed-out job is requeued
    extra: dict[str, str] = field(default_factory=dict)  # any other sbatch option: {"account": "x"}


def minutes(text: str) -> int:
    """Slurm's time limit formats as whole minutes: "90", "1:30:00", "2-00:00:00"."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)|(\d+)", text.strip())
    if not match:
        raise ConfigError(f"--time {text}: give minutes, H:MM:SS or D-HH:MM:SS")
    if match.group(5):
        return int(match.group(5))
    days, hours, mins, secs = (int(group or 0) for group in match.groups()[:4])
    return days * 24 * 60 + hours * 60 + mins + (secs > 0)


def submit(cells: list[Cell], output: str, options: SlurmOptions, cluster: str = "slurm") -> list[tuple[Cell, object]]:
    """Submit the cells neither finished nor running (one array); returns each with its submitit job."""
    todo = [cell for cell in cells if cell_state(cell).action not in (SKIP, RUNNING)]
    if not todo:
        return []
    try:
        executor = submitit.AutoExecutor(folder=os.path.join(output, SUBMITIT_FOLDER, "%j"), cluster=cluster,
                                         slurm_max_num_timeout=options.requeues)
    except RuntimeError as error:
        raise SlurmUnavailableError(f"--executor slurm: {error} (--cluster local runs the jobs on this machine)") from None
    executor.update_parameters(
        name=os.path.basename(output), timeout_min=minutes(options.time), gpus_per_node=options.gpus,
        tasks_per_node=1, cpus_per_task=options.cpus, mem_gb=options.mem_gb,
        slurm_partition=options.partition, slurm_constraint=options.constraint,
        slurm_array_parallelism=options.array_parallelism,
        slurm_additional_parameters=options.extra or None,
    )
    jobs = executor.submit_array([CellJob(cell, options.gpus) for cell in todo])
    return list(zip(todo, jobs))
