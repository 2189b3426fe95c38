"""A trained run, ready to analyse: its config, student (NDAM re-attached), teacher and validation images."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from yacs.config import CfgNode

from ..dataset import get_dataset
from ..distillers import distiller_dict
from ..engine.build import load_teacher, load_trained_model
from ..engine.cfg import load_cfg
from ..engine.checkpoint import load_checkpoint
from .runs import CONFIG_FILE, canonical_method


@dataclass
class LoadedRun:
    path: str
    cfg: CfgNode
    student: nn.Module  # in eval mode, on the device
    checkpoint: str  # the student checkpoint file read

    @property
    def label(self) -> str:
        """The method and the folder name, e.g. ``LAKD: lakd,res56,res20``."""
        return f"{canonical_method(self.cfg.DISTILLER.TYPE)}: {os.path.basename(os.path.normpath(self.path))}"

    @property
    def teacher_source(self) -> tuple[str, str]:
        """What identifies the teacher: architecture and checkpoint setting."""
        return self.cfg.DISTILLER.TEACHER, self.cfg.DISTILLER.TEACHER_CKPT


def run_config(run_dir: str, fallback_cfg: str | None, opts: Sequence[str] = ()) -> CfgNode:
    """The config saved in ``run_dir`` (else ``fallback_cfg``) with ``opts`` overrides. The
    validation images are read through the torchvision pipeline: the same values as the tensor one,
    and a dataset that can be indexed."""
    saved = os.path.join(run_dir, CONFIG_FILE)
    path = saved if os.path.isfile(saved) else fallback_cfg
    if path is None:
        raise FileNotFoundError(
            f"{run_dir}: no {CONFIG_FILE} in the run folder; pass the config it was trained with: --cfg FILE"
        )
    return load_cfg(path, [*opts, "DATASET.PIPELINE", "torchvision"])


def load_student(run_dir: str, cfg: CfgNode, checkpoint_name: str, num_classes: int) -> nn.Module:
    """The student saved as ``run_dir/checkpoint_name``, NDAM re-attached when it was trained with it."""
    path = os.path.join(run_dir, checkpoint_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no student checkpoint '{checkpoint_name}' (choose one with --ckpt)")
    arch = load_checkpoint(path).get("arch", cfg.DISTILLER.STUDENT)
    return load_trained_model(path, arch, cfg.DATASET.TYPE, num_classes, f"{path}: arch").eval()


def load_runs(
    run_dirs: Sequence[str], fallback_cfg: str | None, opts: Sequence[str], checkpoint_name: str,
    device: torch.device,
) -> tuple[list[LoadedRun], nn.Module, DataLoader]:
    """The runs' students, the teacher of the first run and its validation loader. The runs must
    share the teacher and the dataset: their results are drawn against one teacher."""
    configs = [run_config(run_dir, fallback_cfg, opts) for run_dir in run_dirs]
    first = configs[0]
    for run_dir, cfg in zip(run_dirs, configs):
        mismatch = [key for key, a, b in (
            ("DATASET.TYPE", cfg.DATASET.TYPE, first.DATASET.TYPE),
            ("DISTILLER.TEACHER", cfg.DISTILLER.TEACHER, first.DISTILLER.TEACHER),
            ("DISTILLER.TEACHER_CKPT", cfg.DISTILLER.TEACHER_CKPT, first.DISTILLER.TEACHER_CKPT),
        ) if a != b]
        if mismatch:
            raise ValueError(
                f"{run_dir}: its {', '.join(mismatch)} differs from {run_dirs[0]}'s; analyse runs with different "
                "teachers or datasets separately, or give all one teacher: --opts DISTILLER.TEACHER NAME "
                "DISTILLER.TEACHER_CKPT FILE"
            )
    _, val_loader, _, num_classes = get_dataset(first)
    runs = [
        LoadedRun(run_dir, cfg, load_student(run_dir, cfg, checkpoint_name, num_classes).to(device), checkpoint_name)
        for run_dir, cfg in zip(run_dirs, configs)
    ]
    teacher = load_teacher(first, num_classes).to(device)
    return runs, teacher, val_loader


def distiller_checkpoint_name(student_checkpoint: str) -> str:
    """The distiller checkpoint the trainer writes together with a student checkpoint:
    ``student_best`` -> ``best``, ``student_latest`` -> ``latest``, ``student_N`` -> ``epoch_N``."""
    name = student_checkpoint.removeprefix("student_")
    return f"epoch_{name}" if name.isdigit() else name


def load_masking_distiller(run: LoadedRun, teacher: nn.Module, device: torch.device) -> nn.Module | None:
    """The run's distiller, in eval mode, when its method computes masks (it has ``masks(image)``,
    as ACAM_KD): built around the run's student and ``teacher``, its own modules (those outside the
    student and teacher) read from the distiller checkpoint saved with the student. None for methods
    without masks."""
    method = distiller_dict.get(run.cfg.DISTILLER.TYPE)
    if not callable(getattr(method, "masks", None)):
        return None
    path = os.path.join(run.path, distiller_checkpoint_name(run.checkpoint))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{run.path}: no distiller checkpoint '{os.path.basename(path)}' beside '{run.checkpoint}'; "
            f"{run.cfg.DISTILLER.TYPE}'s masks come from the modules saved in it"
        )
    distiller = method(run.student, teacher, run.cfg)
    saved = {key: value for key, value in load_checkpoint(path)["model"].items()
             if not key.startswith(("student.", "teacher."))}
    missing, unexpected = distiller.load_state_dict(saved, strict=False)
    missing = [key for key in missing if not key.startswith(("student.", "teacher."))]
    if missing or unexpected:
        raise ValueError(f"{path}: not a {run.cfg.DISTILLER.TYPE} checkpoint of this config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return distiller.to(device).eval()


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread over ``range(total)`` (ImageNet's validation folder is sorted by
    class); all of them when ``count`` is 0 or more than ``total``."""
    count = total if count <= 0 else min(count, total)
    return [i * total // count for i in range(count)]


def subset_loader(val_loader: DataLoader, indices: Sequence[int], batch_size: int | None = None) -> DataLoader:
    """The validation images at ``indices``, in that order, without shuffling."""
    size = len(val_loader.dataset)
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise IndexError(f"image indices {bad} are outside the validation set (0..{size - 1})")
    return DataLoader(
        Subset(val_loader.dataset, list(indices)), batch_size=batch_size or val_loader.batch_size,
        shuffle=False, num_workers=val_loader.num_workers,
    )
