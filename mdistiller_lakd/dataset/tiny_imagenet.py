"""Tiny-ImageNet (200 classes of 64x64 images) as upstream mdistiller reads it.

``DATASET.ROOT/tiny-imagenet-200/train/<wnid>/...`` and ``val/<wnid>/...``, read as torchvision
ImageFolders (images anywhere under a class folder: ``<wnid>/images/*.JPEG`` as the archive ships
``train/``, or ``<wnid>/*.JPEG``); class indices are the sorted class folder names, as upstream. The
archive's own ``val/`` layout (``val/images/*.JPEG`` with ``val/val_annotations.txt``) is read
through the annotations, in the order ImageFolder gives the re-arranged folder. Upstream's
transforms (rotation by up to 20 degrees and horizontal flips for training, no resizing) and
normalisation; CRD's contrastive indices drawn with replacement, as upstream.
"""
from __future__ import annotations

import os

from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from yacs.config import CfgNode

from .common import DatasetNotFoundError, IndexedDataset, crd_sampler, make_loaders

MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
NUM_CLASSES = 200  # the models' outputs, whatever subset of classes a tree holds (as upstream)
FOLDER = "tiny-imagenet-200"
ANNOTATIONS = "val_annotations.txt"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def train_transform() -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomRotation(20),
        transforms.RandomHorizontalFlip(0.5),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def eval_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


class AnnotatedValidation(Dataset):
    """The archive's ``val/``: images in ``val/images``, their classes in ``val_annotations.txt``
    (``<file>\\t<wnid>\\t<box>``). Ordered as ImageFolder orders the same images sorted into class
    folders: by class index, then file name."""

    def __init__(self, val_dir: str, class_to_idx: dict[str, int], transform=None) -> None:
        self.transform = transform
        annotations = os.path.join(val_dir, ANNOTATIONS)
        samples = []
        with open(annotations) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                name, wnid = line.split("\t")[:2]
                if wnid not in class_to_idx:
                    raise ValueError(f"{annotations}, line {number}: class {wnid} has no folder in the training set")
                samples.append((os.path.join(val_dir, "images", name), class_to_idx[wnid]))
        self.samples = sorted(samples, key=lambda sample: (sample[1], os.path.basename(sample[0])))
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = default_loader(path)
        return (self.transform(image) if self.transform else image), target


def validation_set(val_dir: str, train_images: ImageFolder) -> Dataset:
    """The validation images, from whichever of the two layouts ``val_dir`` has."""
    if os.path.isfile(os.path.join(val_dir, ANNOTATIONS)) and os.path.isdir(os.path.join(val_dir, "images")):
        return AnnotatedValidation(val_dir, train_images.class_to_idx, eval_transform())
    val_images = ImageFolder(val_dir, transform=eval_transform())
    if val_images.classes != train_images.classes:
        raise ValueError(
            f"the class folders of {val_dir} ({len(val_images.classes)}) differ from those of "
            f"{os.path.dirname(val_dir)}/train ({len(train_images.classes)}); both need the same class sub-folders"
        )
    return val_images


def tiny_imagenet_loaders(cfg: CfgNode) -> tuple[DataLoader, DataLoader, int, int]:
    """``get_dataset`` for DATASET.TYPE tiny_imagenet."""
    root = os.path.join(cfg.DATASET.ROOT, FOLDER)
    train_dir, val_dir = (os.path.join(root, split) for split in ("train", "val"))
    missing = [path for path in (train_dir, val_dir) if not os.path.isdir(path)]
    if missing:
        raise DatasetNotFoundError(
            f"Tiny-ImageNet not found: missing folder(s) {', '.join(missing)}. It is not downloaded "
            f"automatically: download {URL} and unzip it in DATASET.ROOT ({cfg.DATASET.ROOT}), so that "
            f"{root}/train and {root}/val exist (val/ as unzipped, or sorted into class folders)."
        )
    train_images = ImageFolder(train_dir, transform=train_transform())
    if len(train_images.classes) > NUM_CLASSES:
        raise ValueError(f"{train_dir} has {len(train_images.classes)} class folders; Tiny-ImageNet has {NUM_CLASSES}")
    val_images = validation_set(val_dir, train_images)
    contrastive = crd_sampler(cfg, train_images.targets, always_replace=True)
    train_loader, val_loader = make_loaders(IndexedDataset(train_images, contrastive), val_images, cfg)
    return train_loader, val_loader, len(train_images), NUM_CLASSES
