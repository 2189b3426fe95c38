"""Models and distiller of a run, built from its config; the teacher loaded from its checkpoint."""
from __future__ import annotations

import os

import torch.nn as nn
from yacs.config import CfgNode

from ..distillers import distiller_dict
from ..models import imagenet_model_dict, zoo_of
from .cfg import ConfigError
from .checkpoint import load_checkpoint, load_weights
from .download import TeacherDownloadError, archive_member, download_released_teachers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELEASED_TEACHERS_URL = "https://github.com/megvii-research/mdistiller/releases/tag/checkpoints"


class TeacherNotFoundError(FileNotFoundError):
    """No teacher checkpoint where the config points; the message says how to get one."""


def build_model(name: str, dataset: str, num_classes: int, key: str, pretrained: bool = False) -> nn.Module:
    """A fresh model ``name`` of the CIFAR, Tiny-ImageNet or ImageNet zoo; ``key`` is the config key
    that named it."""
    zoo = imagenet_model_dict if dataset == "imagenet" else zoo_of(dataset)
    if name not in zoo:
        raise ConfigError(f"{key}: unknown {dataset} model '{name}'; known: {', '.join(sorted(zoo))}")
    if dataset == "imagenet":
        return zoo[name](pretrained=pretrained)
    return zoo[name][0](num_classes=num_classes)


def load_trained_model(
    path: str, name: str, dataset: str, num_classes: int, key: str, with_ndam: bool = True
) -> nn.Module:
    """Model ``name`` with the weights of the checkpoint at ``path`` (ours or upstream's), with
    LAKD's NDAM re-attached when the checkpoint carries an ``"ndam"`` entry: NDAM is part of the
    trained student's forward, so the student is evaluated and analysed as it was trained.
    ``with_ndam=False`` gives the weights alone in the plain model, which is another network."""
    model = build_model(name, dataset, num_classes, key)
    checkpoint = load_checkpoint(path)
    load_weights(model, checkpoint, path, name)
    if with_ndam and "ndam" in checkpoint:
        from ..lakd.ndam import attach_ndam

        attach_ndam(model, **checkpoint["ndam"])
    return model


def _teacher_not_found(cfg: CfgNode, path: str | None, download_failure: str = "") -> TeacherNotFoundError:
    name, dataset = cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE
    own_run = os.path.join(cfg.LOG.PREFIX, f"{dataset}_baselines", f"vanilla,{name}", "student_best")
    config = f"configs/{dataset}/vanilla/{name}.yaml"
    if not os.path.isfile(os.path.join(REPO_ROOT, config)):
        config += f" (a copy of configs/{dataset}/vanilla/resnet56.yaml with {name} for resnet56)"
    train_here = f"train it here: python tools/train.py --cfg {config}\n    then set DISTILLER.TEACHER_CKPT {own_run}"
    if cfg.DISTILLER.TEACHER_CKPT:
        return TeacherNotFoundError(
            f"DISTILLER.TEACHER_CKPT: teacher checkpoint not found: {path}\n  - fix the path, or\n  - {train_here}"
        )
    if dataset == "tiny_imagenet":
        where = f"not found: {os.path.abspath(path)}" if path else "(upstream has none for this model)"
        return TeacherNotFoundError(
            f"Tiny-ImageNet teacher checkpoint for '{name}' {where}\n"
            f"  - put upstream mdistiller's Tiny-ImageNet teacher checkpoint at that path, or\n  - {train_here}"
        )
    if path is None:
        return TeacherNotFoundError(
            f"no released {dataset} teacher checkpoint for '{name}' (upstream mdistiller releases CIFAR-100 "
            f"teachers only, for its teacher models)\n  - {train_here}"
        )
    by_hand = (
        f"put upstream mdistiller's released teachers there: download cifar_teachers.tar from "
        f"{RELEASED_TEACHERS_URL} and untar it into {archive_member(path)[0]} so that this file exists, or"
    )
    if download_failure:
        return TeacherNotFoundError(
            f"teacher checkpoint for '{name}' not found: {os.path.abspath(path)}, and {download_failure}; "
            f"no teacher file was written\n  - run the command again (a network fault), or\n  - {by_hand}\n"
            f"  - {train_here}"
        )
    return TeacherNotFoundError(
        f"teacher checkpoint for '{name}' not found: {os.path.abspath(path)}\n"
        f"  - set DISTILLER.TEACHER_URL to download them (default: upstream's release), or\n"
        f"  - {by_hand}\n  - {train_here}"
    )


def load_teacher(cfg: CfgNode, num_classes: int) -> nn.Module:
    """The trained teacher ``DISTILLER.TEACHER`` in eval mode, read from ``DISTILLER.TEACHER_CKPT``
    or, when that is empty, from upstream's released-teacher location, downloaded from
    ``DISTILLER.TEACHER_URL`` when missing there (ImageNet: torchvision-style pretrained weights).
    Fails with ``TeacherNotFoundError`` before any training when it cannot be had."""
    name, dataset = cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE
    if dataset == "imagenet" and not cfg.DISTILLER.TEACHER_CKPT:
        return build_model(name, dataset, num_classes, "DISTILLER.TEACHER", pretrained=True).eval()
    model = build_model(name, dataset, num_classes, "DISTILLER.TEACHER")
    path = cfg.DISTILLER.TEACHER_CKPT
    if not path and dataset in ("cifar100", "tiny_imagenet"):
        path = zoo_of(dataset)[name][1]
        if path and not os.path.isfile(path) and cfg.DISTILLER.TEACHER_URL and dataset == "cifar100":
            try:
                download_released_teachers(cfg.DISTILLER.TEACHER_URL, path)
            except TeacherDownloadError as error:
                raise _teacher_not_found(cfg, path, download_failure=str(error)) from None
    if not path or not os.path.isfile(path):
        raise _teacher_not_found(cfg, path or None)
    load_weights(model, load_checkpoint(path), path, name)
    return model.eval()


def make_distiller(cfg: CfgNode, student: nn.Module, teacher: nn.Module | None, num_data: int,
                   num_classes: int) -> nn.Module:
    """``distiller_dict[DISTILLER.TYPE](student, teacher, cfg, **extra)``, ``extra`` being what the
    class's ``build_kwargs`` takes from the dataset or from files (CRD's memory banks and PS-KD's
    prediction buffer: the training-set size ``num_data``; MCMI: the weights it fine-tunes); a
    ``ValueError`` becomes a ``ConfigError`` naming the method."""
    method = cfg.DISTILLER.TYPE
    distiller_class = distiller_dict[method]
    try:
        extra = distiller_class.build_kwargs(cfg, student, num_classes, num_data)
        return distiller_class(student, teacher, cfg, **extra)
    except ConfigError:  # already names its key (e.g. the dataset's)
        raise
    except ValueError as error:  # distillers stay free of our config types, to go upstream as-is
        raise ConfigError(f"{method}: {error}") from None


def build_distiller(cfg: CfgNode, num_classes: int, num_data: int) -> nn.Module:
    """The run's distiller around a fresh student and, when the method ``requires_teacher``, the
    loaded teacher (else ``teacher=None``: no checkpoint needed, ``DISTILLER.TEACHER`` ignored)."""
    method = cfg.DISTILLER.TYPE
    if method not in distiller_dict:
        raise ConfigError(f"DISTILLER.TYPE: unknown method '{method}'; known: {', '.join(sorted(distiller_dict))}")
    student = build_model(cfg.DISTILLER.STUDENT, cfg.DATASET.TYPE, num_classes, "DISTILLER.STUDENT")
    teacher = load_teacher(cfg, num_classes) if distiller_dict[method].requires_teacher else None
    return make_distiller(cfg, student, teacher, num_data, num_classes)
