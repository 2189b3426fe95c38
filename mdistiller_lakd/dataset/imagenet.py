"""ImageNet from ImageFolder trees ``DATASET.ROOT/{train,val}/<class>/<image>``, torchvision's transforms."""
from __future__ import annotations

import os

from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder
from yacs.config import CfgNode

from .common import DatasetNotFoundError, IndexedDataset, crd_sampler, make_loaders

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def train_transform() -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def eval_transform() -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def imagenet_loaders(cfg: CfgNode) -> tuple[DataLoader, DataLoader, int, int]:
    """``get_dataset`` for DATASET.TYPE imagenet."""
    train_dir, val_dir = (os.path.join(cfg.DATASET.ROOT, split) for split in ("train", "val"))
    missing = [path for path in (train_dir, val_dir) if not os.path.isdir(path)]
    if missing:
        raise DatasetNotFoundError(
            f"ImageNet not found: missing folder(s) {', '.join(missing)}. ImageNet is not downloaded "
            "automatically: get ILSVRC2012 from https://image-net.org/ and lay out train/ and val/ "
            "under DATASET.ROOT as one sub-folder of images per class (val images sorted into the "
            "class folders), or point DATASET.ROOT at the folder that holds them."
        )
    train_images = ImageFolder(train_dir, transform=train_transform())
    val_images = ImageFolder(val_dir, transform=eval_transform())
    if val_images.classes != train_images.classes:
        raise ValueError(
            f"the class folders of {val_dir} ({len(val_images.classes)}) differ from those of "
            f"{train_dir} ({len(train_images.classes)}); both need the same class sub-folders"
        )
    # Upstream samples ImageNet's CRD negatives with replacement whatever K is.
    contrastive = crd_sampler(cfg, train_images.targets, always_replace=True)
    train_loader, val_loader = make_loaders(IndexedDataset(train_images, contrastive), val_images, cfg)
    return train_loader, val_loader, len(train_images), len(train_images.classes)
