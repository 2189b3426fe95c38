"""Grid files, their cells, what each cell needs (run, resume, skip), and the grid's results table.

A grid file is YAML with the keys

    configs:  [configs/cifar100/kd/res56_res20.yaml, "configs/cifar100/lakd/*.yaml"]  # files or globs
    seeds:    [0, 1, 2]                   # EXPERIMENT.SEED of the cells
    opts:     [SOLVER.EPOCHS, 240]        # KEY VALUE overrides for every cell (optional)
    variants: {default: [], no_detach: [LAKD.DETACH, False]}  # named override lists (optional)
    output:   output/grids/table1         # LOG.PREFIX of every cell (default output/grids/<grid name>)

Config entries are looked up relative to the grid file's folder, then to the repository root;
``output`` and the paths inside configs are relative to the working directory. The grid is the
product configs x variants x seeds; a cell is ``tools/train.py --cfg CONFIG --name NAME OPTS VARIANT
EXPERIMENT.SEED s LOG.PREFIX output``. Its run folder ``output/NAME`` is named by what tells the cells
apart: ``PROJECT/TAG,variant,seedS`` (the config's EXPERIMENT.PROJECT and NAME or TAG), the variant
left out when the grid has one variant or it is named ``default``; every setting is in the folder's
``config.yaml``. A cell run before grids named folders so (``output/`` followed by train.py's own
name: the tag and every override) keeps its folder. What a cell needs is read from its folder: a
run in progress (the folder's lock is held, engine/runlock.py) is left alone, a finished run (every
epoch and the closing ``best_acc`` line in its worklog) is skipped, a run with a ``latest``
checkpoint is resumed, any other cell starts from scratch.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import BinaryIO, Sequence

import yaml

from ..analysis.runs import WORKLOG, RunError, group_runs, markdown_table, parse_worklog, read_run, summary_rows
from ..engine.build import REPO_ROOT
from ..engine.cfg import ConfigError, load_cfg, yaml_error_message
from ..engine.checkpoint import atomic_write
from ..engine.preemption import REQUEUE_EXIT_STATUS
from ..engine.runlock import live_holder
from ..engine.utils import experiment_name

TRAIN_SCRIPT = os.path.join(REPO_ROOT, "tools", "train.py")
GRID_KEYS = ("configs", "seeds", "opts", "variants", "output")
# Keys the grid sets for each cell itself: from `seeds` and `output`.
SEED_KEY, PREFIX_KEY = "EXPERIMENT.SEED", "LOG.PREFIX"
LOG_FILE = "grid.log"  # in the run folder: the output of every attempt at the cell, appended
EXIT_FILE = "grid_exit"  # in the run folder: the exit status of the last attempt

RUN, RESUME, SKIP, RUNNING = "run", "resume", "skip", "running"
DEFAULT_VARIANT = "default"  # a variant of this name is left out of folder names


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    name: str  # "PROJECT/TAG[,variant],seedS": how listings and the report call it
    entry: str  # the grid entry it comes from, for messages
    config: str  # absolute path of its config file
    opts: tuple[str, ...]  # every KEY VALUE override of its train.py command
    run_name: str  # its folder under the grid's output: the name, or a folder run before names were so
    run_dir: str  # absolute path of the folder train.py writes
    epochs: int  # SOLVER.EPOCHS of the run
    workdir: str  # where train.py runs: relative paths of the config resolve there

    def train_args(self, resume: bool) -> list[str]:
        """tools/train.py's arguments for this cell."""
        return ["--cfg", self.config, "--name", self.run_name, *(["--resume"] if resume else []), *self.opts]


@dataclass(frozen=True)
class Grid:
    path: str
    output: str  # absolute LOG.PREFIX of the cells
    shape: str  # "2 configs x 1 variant x 2 seeds"
    cells: list[Cell]


@dataclass(frozen=True)
class CellState:
    action: str  # RUN, RESUME, SKIP or RUNNING
    detail: str  # what the run folder shows, for listings ("" for a cell never started)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _overrides(value, where: str) -> list[str]:
    """A grid's KEY VALUE list as train.py's command line gets it (values as text)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) % 2:
        raise ConfigError(f"{where}: give a flat list of KEY VALUE pairs, e.g. [SOLVER.EPOCHS, 240]; got {value!r}")
    for key in value[::2]:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: '{key}' is not a config key")
        if key in (SEED_KEY, PREFIX_KEY):
            raise ConfigError(f"{where}: {key} is set by the grid's `{'seeds' if key == SEED_KEY else 'output'}`")
    return [str(item) for item in value]


def _checked(opts: list[str], where: str) -> None:
    """Reject override keys or values that no config accepts, naming the grid entry."""
    try:
        load_cfg(None, opts)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: give a non-empty list of seeds, e.g. [0, 1, 2]; got {value!r}")
    bad = [seed for seed in value if isinstance(seed, bool) or not isinstance(seed, int)]
    if bad:
        raise ConfigError(f"{where}: seeds are integers; got {bad[0]!r}")
    return value


def _config_files(entry, where: str, grid_dir: str) -> list[str]:
    """The config files an entry names: a path or glob, under the grid's folder, else the repo root."""
    if not isinstance(entry, str) or not entry:
        raise ConfigError(f"{where}: a config entry is a path or a glob; got {entry!r}")
    for base in (grid_dir, REPO_ROOT):
        found = sorted(path for path in glob.glob(os.path.join(base, entry)) if os.path.isfile(path))
        if found:
            return [os.path.abspath(path) for path in found]
    raise ConfigError(f"{where}: no config file matches it (looked under {grid_dir} and {REPO_ROOT})")


def _read_grid_file(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(f"cannot read grid file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(yaml_error_message(path, error)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid file is a YAML mapping with the keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (grid keys: {', '.join(GRID_KEYS)})")
    return raw


def load_grid(path: str, workdir: str | None = None) -> Grid:
    """The cells of grid file ``path``, every config loaded with its overrides; raises
    ``ConfigError`` naming the entry at fault before anything runs: an unknown config, an override
    key or value that configs lack, an empty seed list, two cells that would share a run folder."""
    raw = _read_grid_file(path)
    workdir = os.path.abspath(workdir or os.getcwd())
    grid_dir = os.path.dirname(os.path.abspath(path))
    entries = raw.get("configs")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: configs: give a non-empty list of config files or globs; got {entries!r}")
    seeds = _seeds(raw.get("seeds"), f"{path}: seeds")
    opts = _overrides(raw.get("opts"), f"{path}: opts")
    _checked(opts, f"{path}: opts")
    raw_variants = raw.get("variants")
    if raw_variants is None:
        variants = {"": []}
    elif isinstance(raw_variants, dict) and raw_variants:
        variants = {str(name): _overrides(value, f"{path}: variants.{name}") for name, value in raw_variants.items()}
        for name, variant in variants.items():
            _checked(opts + variant, f"{path}: variants.{name}")
    else:
        raise ConfigError(f"{path}: variants: give a mapping of names to KEY VALUE lists; got {raw_variants!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    output = os.path.join(workdir, str(raw.get("output") or os.path.join("output", "grids", stem)))

    cells, by_folder = [], {}
    files = [(index, entry, config) for index, entry in enumerate(entries)
             for config in _config_files(entry, f"{path}: configs[{index}] {entry!r}", grid_dir)]
    for index, entry, config in files:
        shown = os.path.relpath(config, REPO_ROOT) if config.startswith(REPO_ROOT + os.sep) else config
        for variant, variant_opts in variants.items():
            try:
                cfg = load_cfg(config, opts + variant_opts)
            except ConfigError as error:
                raise ConfigError(f"{path}: configs[{index}] {entry!r}: {error}") from None
            named_variant = len(variants) > 1 and variant != DEFAULT_VARIANT
            prefix = f"{cfg.EXPERIMENT.PROJECT}/{cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG}" + (
                f",{variant}" if named_variant else "")
            for seed in seeds:
                cell_opts = opts + variant_opts + [SEED_KEY, str(seed), PREFIX_KEY, output]
                name = f"{prefix},seed{seed}"
                run_name = _existing_folder(output, name, experiment_name(cfg, cell_opts))
                cell = Cell(
                    name=name,
                    entry=f"configs[{index}] {entry!r} ({shown}" + (f", variant {variant}" if variant else "")
                          + f", seed {seed})",
                    config=config,
                    opts=tuple(cell_opts),
                    run_name=run_name,
                    run_dir=os.path.join(output, run_name),
                    epochs=cfg.SOLVER.EPOCHS,
                    workdir=workdir,
                )
                if cell.run_dir in by_folder:
                    raise ConfigError(
                        f"{path}: {by_folder[cell.run_dir].entry} and {cell.entry} would share the run folder "
                        f"{cell.run_dir}"
                    )
                by_folder[cell.run_dir] = cell
                cells.append(cell)
    shape = " x ".join([_plural(len(files), "config")] + ([_plural(len(variants), "variant")] if raw_variants else [])
                       + [_plural(len(seeds), "seed")])
    return Grid(path, output, shape, cells)


def _existing_folder(output: str, name: str, old_name: str) -> str:
    """``name``, unless only ``old_name`` (train.py's own folder name for the cell, which grids used
    before) exists under ``output``: a cell run then is found there, not run again."""
    if not os.path.isdir(os.path.join(output, name)) and os.path.isdir(os.path.join(output, old_name)):
        return old_name
    return name


def last_exit_status(cell: Cell) -> int | None:
    """The exit status of the grid's last attempt at ``cell`` (None when never attempted)."""
    try:
        with open(os.path.join(cell.run_dir, EXIT_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def cell_state(cell: Cell) -> CellState:
    """What the grid does with ``cell``, from its run folder."""
    holder = live_holder(cell.run_dir)
    if holder is not None:
        return CellState(RUNNING, holder.describe())
    try:
        with open(os.path.join(cell.run_dir, WORKLOG)) as f:
            epochs, final_best = parse_worklog(f.read())
    except (OSError, UnicodeDecodeError):
        epochs, final_best = {}, None
    logged = max(epochs, default=0)
    if final_best is not None and logged >= cell.epochs:
        return CellState(SKIP, "finished")
    status = last_exit_status(cell)
    failed = attempt_note(status)
    if os.path.exists(os.path.join(cell.run_dir, "latest")):
        return CellState(RESUME, ", ".join(filter(None, [f"{logged}/{cell.epochs} epochs logged", failed])))
    return CellState(RUN, failed)


def attempt_note(status: int | None) -> str:
    """What a cell's last exit status says: "" for none or success."""
    if status == REQUEUE_EXIT_STATUS:  # a signal (preemption, time limit): its `latest` is mid-epoch
        return "last attempt stopped by a signal, resumes where it stopped"
    return f"last attempt exited with status {status}" if status else ""


def train_command(cell: Cell, gpus: int = 1) -> list[str]:
    """The command that runs or resumes ``cell`` now; on ``gpus`` > 1 under torchrun."""
    launcher = [sys.executable]
    if gpus > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    return launcher + [TRAIN_SCRIPT, *cell.train_args(resume=cell_state(cell).action == RESUME)]


def _copy_output(stream: BinaryIO, log_path: str) -> None:
    """Append a child's output to its log as a terminal would leave it: of the text between two
    newlines only what follows the last carriage return (progress bars redraw with one per step)."""
    with open(log_path, "ab") as log:
        line = b""
        for chunk in iter(lambda: stream.read1(1 << 16), b""):
            line += chunk
            *complete, line = line.split(b"\n")
            log.writelines(text.rsplit(b"\r", 1)[-1] + b"\n" for text in complete)
            line = line.rsplit(b"\r", 1)[-1]
            log.flush()
        log.write(line)


class CellRun:
    """``cell``'s training started in the background, its output appended to ``LOG_FILE`` in its run
    folder; ``env`` is added to this process's environment. The exit status is recorded in the run
    folder (``EXIT_FILE``) once the run ends."""

    def __init__(self, cell: Cell, env: dict[str, str] | None = None, gpus: int = 1):
        self.cell = cell
        self.status: int | None = None
        os.makedirs(cell.run_dir, exist_ok=True)
        command = train_command(cell, gpus)
        log_path = os.path.join(cell.run_dir, LOG_FILE)
        with open(log_path, "a") as log:
            log.write(f"[grid] {' '.join(command)}\n")
        self.process = subprocess.Popen(command, cwd=cell.workdir, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self._copier = threading.Thread(target=_copy_output, args=(self.process.stdout, log_path), daemon=True)
        self._copier.start()

    def poll(self) -> int | None:
        """The exit status, or None while the run goes on."""
        return None if self.process.poll() is None else self.wait()

    def wait(self) -> int:
        if self.status is None:
            status = self.process.wait()
            self._copier.join()
            atomic_write(os.path.join(self.cell.run_dir, EXIT_FILE), lambda f: f.write(f"{status}\n".encode()))
            self.status = status
        return self.status

    def terminate(self) -> int:
        self.process.terminate()
        return self.wait()


def last_log_line(cell: Cell) -> str:
    """The last non-empty line of the cell's log (a failed run's error message)."""
    try:
        with open(os.path.join(cell.run_dir, LOG_FILE), errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def listing(grid: Grid) -> str:
    """One line per cell: what the grid would do with it, and its run folder."""
    states = [cell_state(cell) for cell in grid.cells]
    width = max(len(cell.name) for cell in grid.cells)
    lines = [f"{grid.path}: {_plural(len(grid.cells), 'cell')} ({grid.shape}), output {grid.output}"]
    for cell, state in zip(grid.cells, states):
        detail = f" ({state.detail})" if state.detail else ""
        lines.append(f"  {state.action:<7}  {cell.name:<{width}}  {os.path.relpath(cell.run_dir, cell.workdir)}{detail}")
    counts = [f"{sum(s.action == action for s in states)} to {action}" for action in (RUN, RESUME, SKIP)]
    lines.append(", ".join(counts + [f"{sum(s.action == RUNNING for s in states)} running"]))
    return "\n".join(lines)


def report(cells: Sequence[Cell]) -> tuple[str, bool]:
    """The results table of ``cells`` (tools/compare.py's: mean ± std over seeds, best and last,
    gain over the from-scratch student) followed by the cells missing, running, stopped by a signal
    or failed, by name; and whether every cell finished."""
    runs, missing, failed, running, stopped, complete = [], [], [], [], [], True
    for cell in cells:
        state = cell_state(cell)
        complete = complete and state.action == SKIP
        status = last_exit_status(cell)
        if state.action == RUNNING:
            running.append(f"  {cell.name}: {state.detail}")
        elif status == REQUEUE_EXIT_STATUS and state.action != SKIP:
            stopped.append(f"  {cell.name}: {state.detail}")
        elif status and state.action != SKIP:
            failed.append(f"  {cell.name}: exit status {status}, log {os.path.join(cell.run_dir, LOG_FILE)}")
        try:
            runs.append(read_run(cell.run_dir))
        except RunError:
            missing.append(f"  {cell.name}")
    parts = [markdown_table(summary_rows(group_runs(runs)))] if runs else ["no cell has finished an epoch yet"]
    if missing:
        parts.append(f"missing ({len(missing)}: no epoch finished):\n" + "\n".join(missing))
    if running:
        parts.append(f"running ({len(running)}):\n" + "\n".join(running))
    if stopped:
        parts.append(f"stopped by a signal, to resume ({len(stopped)}):\n" + "\n".join(stopped))
    if failed:
        parts.append(f"failed ({len(failed)}):\n" + "\n".join(failed))
    return "\n".join(parts), complete
