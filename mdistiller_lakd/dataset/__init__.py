"""Training and validation loaders for CIFAR-100, CIFAR-10, Tiny-ImageNet and ImageNet, as upstream
mdistiller builds them.

Training batches are ``(image, target, index)``, with CRD's ``contrastive_index`` (B, K + 1) appended
when DISTILLER.TYPE is CRD; validation batches are ``(image, target)``. DATASET.PIPELINE "tensor"
swaps CIFAR's per-image DataLoader for ``TensorCifarLoader`` (batched augmentation, data on ``device``,
``set_epoch``).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from ..engine.cfg import ConfigError
from . import cifar, imagenet, tiny_imagenet
from .cifar import LAYOUTS, cifar_class_pool, cifar_loaders
from .cifar_tensor import TensorCifarLoader
from .common import DatasetNotFoundError
from .imagenet import imagenet_loaders
from .tiny_imagenet import tiny_imagenet_loaders

__all__ = ["DatasetNotFoundError", "TensorCifarLoader", "class_pool", "get_dataset", "normalization"]


FOLDER_LOADERS = {"imagenet": imagenet_loaders, "tiny_imagenet": tiny_imagenet_loaders}  # image-folder datasets


def normalization(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel with which DATASET.TYPE ``kind``'s loaders normalise images."""
    source = {"imagenet": imagenet, "tiny_imagenet": tiny_imagenet}.get(kind, cifar)
    return source.MEAN, source.STD


def _check_pipeline(cfg: CfgNode) -> None:
    pipeline = cfg.DATASET.PIPELINE
    if pipeline not in ("torchvision", "tensor"):
        raise ConfigError(f"DATASET.PIPELINE must be 'torchvision' or 'tensor', got {pipeline!r}")
    if pipeline == "tensor" and cfg.DATASET.TYPE not in LAYOUTS:
        raise ConfigError(
            f"DATASET.PIPELINE 'tensor' is for CIFAR only; use 'torchvision' with DATASET.TYPE "
            f"{cfg.DATASET.TYPE!r}"
        )
    if pipeline == "tensor" and cfg.DISTILLER.TYPE == "CRD":
        raise ConfigError(
            "DATASET.PIPELINE 'tensor' does not draw CRD's contrastive indices; use 'torchvision' "
            "with DISTILLER.TYPE CRD"
        )


def get_dataset(
    cfg: CfgNode, device: torch.device | str | None = None
) -> tuple[DataLoader | TensorCifarLoader, DataLoader | TensorCifarLoader, int, int]:
    """``(train_loader, val_loader, num_data, num_classes)`` for ``cfg.DATASET.TYPE``.

    ``device`` is where the tensor pipeline keeps the data and yields its batches (CPU when None);
    DataLoader batches are always on the CPU.
    """
    kind = cfg.DATASET.TYPE
    if kind not in LAYOUTS and kind not in FOLDER_LOADERS:
        raise ConfigError(f"DATASET.TYPE {kind!r} is not supported; use one of {sorted(LAYOUTS) + sorted(FOLDER_LOADERS)}")
    _check_pipeline(cfg)
    if kind in FOLDER_LOADERS:
        return FOLDER_LOADERS[kind](cfg)
    return cifar_loaders(cfg, device)


def class_pool(cfg: CfgNode, per_class: int, seed: int) -> torch.Tensor:
    """Per-class training images [C, n, 3, 32, 32], normalised as training batches (see
    ``cifar_class_pool``); MCMI's per-step centroid update draws from it. CIFAR only."""
    if cfg.DATASET.TYPE not in LAYOUTS:
        raise ConfigError(
            f"MCMI.UPDATE_CENTROIDS: the per-class image pool is for CIFAR-10/100 only (DATASET.TYPE "
            f"{cfg.DATASET.TYPE!r}: it would not fit in memory); set MCMI.UPDATE_CENTROIDS False"
        )
    return cifar_class_pool(cfg, per_class, seed)
