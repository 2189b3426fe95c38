"""Run an experiment grid: ``python tools/grid.py GRID.yaml [--dry-run | --report] [--executor local|slurm]``.

Every cell (config x variant x seed, see mdistiller_lakd/grid/cells.py) is an ordinary tools/train.py
run; finished cells are skipped, killed ones resumed and running ones (their run folder's lock is
held) left alone, so the same command completes an interrupted grid and may be given again while
its jobs run. ``local`` queues the cells over the visible GPUs (``--gpus N``: the first N; on
the CPU one at a time); ``slurm`` submits one job per cell with submitit (``pip install -e
".[slurm]"``). At the end, or with ``--report``, prints tools/compare.py's table of the grid's runs.
"""
from __future__ import annotations

import argparse
import sys

from mdistiller_lakd.engine.cfg import ConfigError
from mdistiller_lakd.grid.cells import Grid, listing, load_grid, report
from mdistiller_lakd.grid.local import LocalQueue, visible_gpus


def slurm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("slurm executor")
    group.add_argument("--partition", help="Slurm partition")
    group.add_argument("--time", default="24:00:00", help="time limit of each job: minutes, H:MM:SS or D-HH:MM:SS "
                       "(a job that reaches it is requeued and resumes; default %(default)s)")
    group.add_argument("--constraint", help="Slurm constraint, e.g. a GPU type")
    group.add_argument("--cpus", type=int, default=4, help="CPUs per job (default %(default)s)")
    group.add_argument("--mem-gb", type=float, help="memory per job")
    group.add_argument("--array-parallelism", type=int, help="at most this many jobs at once")
    group.add_argument("--requeues", type=int, default=3, help="times a job is requeued after its time limit "
                       "(default %(default)s; preemptions do not count)")
    group.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. account=myproject (repeatable)")
    group.add_argument("--wait", action="store_true", help="wait for the jobs, then print the table")
    group.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                       help="submitit's executor: slurm, or local / debug to try the jobs on this machine")


def run_slurm(args: argparse.Namespace, grid: Grid) -> int:
    try:
        import submitit  # noqa: F401 (the slurm extra)
    except ImportError:
        print('error: --executor slurm needs submitit: pip install -e ".[slurm]"', file=sys.stderr)
        return 2
    from mdistiller_lakd.grid.slurm import SlurmOptions, SlurmUnavailableError, submit

    malformed = [item for item in args.slurm_arg if "=" not in item]
    if malformed:
        print(f"error: --slurm-arg {malformed[0]}: give KEY=VALUE, e.g. account=myproject", file=sys.stderr)
        return 2
    extra = dict(item.split("=", 1) for item in args.slurm_arg)
    options = SlurmOptions(
        partition=args.partition, time=args.time, gpus=1 if args.gpus is None else args.gpus, cpus=args.cpus,
        mem_gb=args.mem_gb, constraint=args.constraint, array_parallelism=args.array_parallelism,
        requeues=args.requeues, extra=extra,
    )
    try:
        jobs = submit(grid.cells, grid.output, options, args.cluster)
    except SlurmUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[grid] submitted {len(jobs)} of {len(grid.cells)} cells (the others are finished or running)")
    for cell, job in jobs:
        print(f"[grid]   job {job.job_id}: {cell.name}")
    if not args.wait:
        print(f"[grid] the table, at any time: python tools/grid.py {args.grid} --report")
        return 0
    for _, job in jobs:
        job.wait()
    return print_report(grid)


def print_report(grid: Grid) -> int:
    table, complete = report(grid.cells)
    print(table)
    return 0 if complete else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", help="a grid file, e.g. configs/grids/table1.yaml")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and what would happen to each")
    parser.add_argument("--report", action="store_true", help="print the table of the grid's runs and exit")
    parser.add_argument("--executor", default="local", choices=["local", "slurm"])
    parser.add_argument("--gpus", type=int, help="local: use the first N visible GPUs (0: the CPU); "
                        "slurm: GPUs per job (default 1; more run train.py under torchrun)")
    slurm_args(parser)
    args = parser.parse_args(argv)

    try:
        grid = load_grid(args.grid)
        if args.dry_run:
            print(listing(grid))
            return 0
        if args.report:
            return print_report(grid)
        if args.executor == "slurm":
            return run_slurm(args, grid)
        LocalQueue(grid.cells, visible_gpus(args.gpus)).run()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return print_report(grid)


if __name__ == "__main__":
    sys.exit(main())
