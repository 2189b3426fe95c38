"""Run folders of this project and of upstream mdistiller / CAT-KD: their worklogs, what they ran, and
the statistics ``tools/compare.py`` tabulates.

``worklog.txt`` (both projects) holds one block per epoch, ``key: value`` lines between two lines of
25 dashes (``epoch``, ``lr``, ``train_acc``, ``train_loss``, ``test_acc``, ``test_acc_top5``,
``test_loss``; ours adds ``test_ek``, ``test_agreement``), and after the last epoch one line
``best_acc<TAB>value``. What a run trained comes from its saved config (``config.yaml`` in the run
folder) when there is one, else from the folder name, which both projects build from
``EXPERIMENT.TAG`` ("kd,res56,res20") followed by the command-line overrides ("SOLVER.LR:0.1").
"""
from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from yacs.config import CfgNode

from ..distillers import distiller_dict
from ..engine.cfg import ConfigError, load_cfg

WORKLOG = "worklog.txt"
CONFIG_FILE = "config.yaml"
FROM_SCRATCH = "vanilla"  # the method name of a student trained alone (DISTILLER.TYPE NONE)
SEED_KEY = "EXPERIMENT.SEED"

_RULE = re.compile(r"^-{5,}$")
_BEST_LINE = re.compile(r"^best_acc[\s:]+(\S+)$")
# An override tag "KEY.PATH:value"; upstream glues the first one to the tag ("res20SOLVER.LR:0.1").
_OVERRIDE = re.compile(r"[A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)+:")
# Upstream's short model names in tags (ResNets are handled by `canonical_model`).
_MODEL_ALIASES = {"mv2": "MobileNetV2", "shuv1": "ShuffleV1", "shuv2": "ShuffleV2"}
_IMAGENET_RESNET_DEPTHS = {"18", "34", "50", "101", "152"}
_DATASETS = ("cifar100", "cifar10", "tiny_imagenet", "imagenet")  # longest match first
# Config keys that do not change what a run computes: runs differing only there share a config.
_NEUTRAL_SECTIONS = ("EXPERIMENT", "LOG")
_NEUTRAL_DATASET_KEYS = ("DATASET.ROOT", "DATASET.NUM_WORKERS", "DATASET.DOWNLOAD")


class RunError(ValueError):
    """A folder that cannot be read as a run; the message names the folder and what is wrong."""


@dataclass
class Run:
    path: str
    epochs: dict[int, dict[str, float]]  # epoch -> its worklog values, in epoch order
    final_best: float | None  # the closing best_acc line; None while the run is going
    dataset: str
    method: str
    teacher: str | None  # None for a student trained from scratch
    student: str
    # What the run was configured with, seed, names and paths aside: every key of its config, or,
    # read from a folder name, the override tags ("SOLVER.LR": "0.1").
    settings: dict[str, str]
    total_epochs: int | None  # SOLVER.EPOCHS when the config is known
    source: str = "folder name"  # where method and pair were read: CONFIG_FILE or the folder name
    warnings: list[str] = field(default_factory=list)

    @property
    def last_epoch(self) -> int:
        return max(self.epochs)

    @property
    def accuracies(self) -> list[tuple[int, float]]:
        return [(epoch, values["test_acc"]) for epoch, values in self.epochs.items() if "test_acc" in values]

    @property
    def best(self) -> float:
        if self.final_best is not None:
            return self.final_best
        return max(acc for _, acc in self.accuracies)

    @property
    def last(self) -> float:
        return self.accuracies[-1][1]

    @property
    def finished(self) -> bool:
        reached = self.total_epochs is None or self.last_epoch >= self.total_epochs
        return self.final_best is not None and reached

    @property
    def progress(self) -> str:
        total = "?" if self.total_epochs is None else str(self.total_epochs)
        return f"epoch {self.last_epoch}/{total}"

    @property
    def label(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def identity(self) -> tuple:
        """What rows are named by: how the run was read, dataset, pair and method."""
        return self.source, self.dataset, self.teacher or "", self.student, self.method


def parse_worklog(text: str) -> tuple[dict[int, dict[str, float]], float | None]:
    """The per-epoch values and the final best accuracy (None if absent) of a worklog's text.

    An epoch logged twice (a run resumed by a trainer that does not trim its worklog) keeps its last
    block. Values that are not numbers are skipped.
    """
    epochs: dict[int, dict[str, float]] = {}
    block: dict[str, float] = {}
    final_best = None
    for line in text.splitlines() + ["-" * 5]:
        line = line.strip()
        best = _BEST_LINE.match(line)
        if _RULE.match(line) or best:
            if "epoch" in block:
                epochs[int(block.pop("epoch"))] = block
            block = {}
            if best:
                final_best = float(best.group(1))
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        try:
            block[key.strip()] = float(value)
        except ValueError:
            continue
    return dict(sorted(epochs.items())), final_best


def canonical_model(name: str) -> str:
    """A model named in a tag ("res56", "resnet34", "mv2") by its model-zoo name ("resnet56",
    "ResNet34", "MobileNetV2"): ResNets of the ImageNet-style depths are the capitalised ones."""
    if name in _MODEL_ALIASES:
        return _MODEL_ALIASES[name]
    match = re.fullmatch(r"res(?:net)?(\d+(?:x\d+)?)", name, flags=re.IGNORECASE)
    if match:
        depth = match.group(1)
        return f"ResNet{depth}" if depth in _IMAGENET_RESNET_DEPTHS else f"resnet{depth}"
    return name


def canonical_method(name: str) -> str:
    """Method names as compared across projects: upper case with '_' ("CAT-KD" is "CAT_KD"),
    ``vanilla`` for training from scratch."""
    name = name.upper().replace("-", "_")
    return FROM_SCRATCH if name in ("NONE", "VANILLA") else name


def split_overrides(name: str) -> tuple[str, list[str]]:
    """A run folder's name as (tag, ["KEY:value" overrides]); the seed override is kept."""
    start = _OVERRIDE.search(name)
    if start is None:
        return name, []
    tag, rest = name[: start.start()].rstrip(","), name[start.start():]
    starts = [match.start() for match in _OVERRIDE.finditer(rest)] + [len(rest)]
    return tag, [rest[a:b].rstrip(",") for a, b in zip(starts, starts[1:])]


def _dataset_from_path(path: str) -> str:
    project = os.path.basename(os.path.dirname(os.path.normpath(path))).lower()
    return next((name for name in _DATASETS if name in project), "?")


def _settings(cfg: CfgNode, prefix: str = "") -> dict[str, str]:
    """Every key of ``cfg`` as ``{"SOLVER.LR": "0.05", ...}``, without the keys that leave the
    computation unchanged (seed, names, logging, data location)."""
    settings = {}
    for key, value in cfg.items():
        name = prefix + key
        if name in _NEUTRAL_SECTIONS or name in _NEUTRAL_DATASET_KEYS:
            continue
        if isinstance(value, CfgNode):
            settings.update(_settings(value, name + "."))
        else:
            settings[name] = str(value)
    return settings


def read_run(path: str) -> Run:
    """The run in folder ``path``; raises ``RunError`` naming the folder when it cannot be read."""
    worklog_path = os.path.join(path, WORKLOG)
    try:
        with open(worklog_path) as f:
            epochs, final_best = parse_worklog(f.read())
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"{path}: cannot read {WORKLOG}: {error}") from None
    if not any("test_acc" in values for values in epochs.values()):
        raise RunError(f"{path}: {WORKLOG} holds no epoch with a test_acc line")

    tag, overrides = split_overrides(os.path.basename(os.path.normpath(path)))
    run_warnings = []
    config_path = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(config_path):
        try:
            cfg = load_cfg(config_path)
        except ConfigError as error:
            run_warnings.append(f"config ignored, run read from its folder name ({error})")
        else:
            method = canonical_method(cfg.DISTILLER.TYPE)
            # DISTILLER.TEACHER is ignored by the student alone and by self-distillation methods.
            distiller_class = distiller_dict.get(cfg.DISTILLER.TYPE)
            has_teacher = distiller_class.requires_teacher if distiller_class else method != FROM_SCRATCH
            return Run(
                path, epochs, final_best, cfg.DATASET.TYPE, method,
                cfg.DISTILLER.TEACHER if has_teacher else None, cfg.DISTILLER.STUDENT,
                _settings(cfg), cfg.SOLVER.EPOCHS, CONFIG_FILE,
            )
    parts = [part for part in tag.split(",") if part]
    if len(parts) < 2:
        raise RunError(
            f"{path}: no {CONFIG_FILE}, and the folder name is not a 'method,teacher,student' tag; copy the "
            f"config the run was trained with into the folder as {CONFIG_FILE}"
        )
    method = canonical_method(parts[0])
    teacher = None if method == FROM_SCRATCH or len(parts) < 3 else canonical_model(parts[1])
    settings = dict(item.split(":", 1) for item in overrides if not item.startswith(SEED_KEY + ":"))
    return Run(
        path, epochs, final_best, _dataset_from_path(path), method, teacher, canonical_model(parts[-1]),
        settings, None, warnings=run_warnings,
    )


def find_run_folders(path: str) -> list[str]:
    """``path`` itself when it holds a worklog, else every folder below it that does."""
    if os.path.isfile(os.path.join(path, WORKLOG)):
        return [path]
    found = [root for root, _, files in os.walk(path) if WORKLOG in files]
    return sorted(found)


def read_runs(paths: Iterable[str]) -> tuple[list[Run], list[str]]:
    """The readable runs under ``paths`` and one message per folder that was skipped."""
    runs, skipped = [], []
    for path in paths:
        if not os.path.isdir(path):
            skipped.append(f"{path}: not a folder")
            continue
        folders = find_run_folders(path)
        if not folders:
            skipped.append(f"{path}: no {WORKLOG} in it or below it")
        for folder in folders:
            try:
                runs.append(read_run(folder))
            except RunError as error:
                skipped.append(str(error))
    return runs, skipped


@dataclass
class Group:
    """Runs that share a config (seeds aside) and are all finished, or all still going."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def finished(self) -> bool:
        return self.first.finished

    @property
    def best(self) -> tuple[float, float | None]:
        return mean_std([run.best for run in self.runs])

    @property
    def last(self) -> tuple[float, float | None]:
        return mean_std([run.last for run in self.runs])

    @property
    def status(self) -> str:
        if self.finished:
            return "done"
        return "in progress (" + ", ".join(run.progress for run in self.runs) + ")"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by identity, settings and finished / in progress, ordered by dataset, student,
    teacher and method (the from-scratch student first)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.identity, tuple(sorted(run.settings.items())), run.finished), []).append(run)
    ordered = [Group(members) for members in groups.values()]
    ordered.sort(key=lambda group: (
        group.first.dataset, group.first.student, group.first.teacher or "", group.first.method != FROM_SCRATCH,
        group.first.method, group.first.source, sorted(group.first.settings.items()), not group.finished,
    ))
    return ordered


def _differences(a: dict[str, str], b: dict[str, str]) -> int:
    return sum(a.get(key) != b.get(key) for key in a.keys() | b.keys())


def variant(group: Group, groups: Sequence[Group]) -> str:
    """The settings that tell ``group`` apart from the other groups of its identity ("SOLVER.LR=0.1")."""
    siblings = [other.first.settings for other in groups if other.first.identity == group.first.identity]
    keys = sorted({key for settings in siblings for key in settings})
    differing = [key for key in keys if len({settings.get(key) for settings in siblings}) > 1]
    return ", ".join(f"{key}={group.first.settings.get(key, 'default')}" for key in differing)


def from_scratch_reference(group: Group, groups: Sequence[Group]) -> Group | None:
    """The from-scratch group of ``group``'s student and dataset, preferring a finished one, then one
    read the same way (config or folder name), then the one whose settings differ the least."""
    candidates = [
        other for other in groups
        if other.first.method == FROM_SCRATCH
        and (other.first.dataset, other.first.student) == (group.first.dataset, group.first.student)
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda other: (
        not other.finished, other.first.source != group.first.source,
        _differences(other.first.settings, group.first.settings),
    ))


def summary_rows(groups: Sequence[Group]) -> list[dict]:
    """One dict per group: what ``tools/compare.py`` prints and writes (numbers unrounded)."""
    rows = []
    for group in groups:
        run = group.first
        best_mean, best_std = group.best
        last_mean, last_std = group.last
        reference = from_scratch_reference(group, groups)
        delta = None if reference is None or reference is group else best_mean - reference.best[0]
        rows.append({
            "dataset": run.dataset,
            "teacher": run.teacher or "",
            "student": run.student,
            "method": run.method,
            "variant": variant(group, groups),
            "source": run.source,
            "runs": len(group.runs),
            "best_mean": best_mean,
            "best_std": best_std,
            "last_mean": last_mean,
            "last_std": last_std,
            "delta_best": delta,
            "status": group.status,
            "folders": [r.path for r in group.runs],
        })
    return rows


def _mean_pm_std(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table (accuracies in %, two decimals)."""
    header = ["dataset", "teacher → student", "method", "variant", "source", "runs", "best top-1",
              "last top-1", "Δ best vs student", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        pair = f"{row['teacher']} → {row['student']}" if row["teacher"] else row["student"]
        delta = "" if row["delta_best"] is None else f"{row['delta_best']:+.2f}"
        cells = [row["dataset"], pair, row["method"], row["variant"], row["source"], str(row["runs"]),
                 _mean_pm_std(row["best_mean"], row["best_std"]), _mean_pm_std(row["last_mean"], row["last_std"]),
                 delta, row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_records(rows: Sequence[dict]) -> list[dict]:
    """The rows flattened for ``csv.DictWriter``: empty cells for missing numbers, folders joined by ';'."""
    records = []
    for row in rows:
        record = {key: ("" if value is None else value) for key, value in row.items()}
        record["folders"] = ";".join(row["folders"])
        records.append(record)
    return records

