"""The Slurm executor: one job per cell, submitted as a job array with submitit (the ``slurm``
extra). A job requeued after preemption or its time limit runs the cell again, which then resumes
from the run's ``latest`` checkpoint; ``cluster="local"`` or ``"debug"`` runs the same jobs without
Slurm (submitit's local and in-process executors)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import submitit

from ..engine.cfg import ConfigError
from .cells import RUNNING, SKIP, Cell, CellRun, cell_state

SUBMITIT_FOLDER = "submitit"  # under the grid's output: job scripts, pickles and Slurm's logs


class SlurmUnavailableError(RuntimeError):
    """No Slurm on this machine (submitit finds no srun)."""


class CellJob(submitit.helpers.Checkpointable):
    """A cell as a job. Checkpointable: on preemption or timeout submitit requeues this same object,
    and calling it again resumes the run (the state is read from the run folder at each start)."""

    def __init__(self, cell: Cell, gpus: int = 1):
        self.cell = cell
        self.gpus = gpus

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
        return CellRun(self.cell, gpus=self.gpus).wait()


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
