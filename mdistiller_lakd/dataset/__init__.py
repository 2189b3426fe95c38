"""Training and validation loaders for CIFAR-100, CIFAR-10 and ImageNet, as upstream mdistiller builds them.

Training batches are ``(image, target, index)``, with CRD's ``contrastive_index`` (B, K + 1) appended
when DISTILLER.TYPE is CRD; validation batches are ``(image, target)``.
"""
from __future__ import annotations

from torch.utils.data import DataLoader
from yacs.config import CfgNode

from .cifar import LAYOUTS, cifar_loaders
from .common import DatasetNotFoundError
from .imagenet import imagenet_loaders

__all__ = ["DatasetNotFoundError", "get_dataset"]


def get_dataset(cfg: CfgNode) -> tuple[DataLoader, DataLoader, int, int]:
    """``(train_loader, val_loader, num_data, num_classes)`` for ``cfg.DATASET.TYPE``."""
    kind = cfg.DATASET.TYPE
    if kind in LAYOUTS:
        return cifar_loaders(cfg)
    if kind == "imagenet":
        return imagenet_loaders(cfg)
    raise ValueError(f"DATASET.TYPE {kind!r} is not supported; use one of {sorted(LAYOUTS) + ['imagenet']}")
