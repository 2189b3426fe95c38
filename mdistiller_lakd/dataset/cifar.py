"""CIFAR-10/100 read from the python-pickle files the CIFAR authors distribute, upstream's augmentation.

The files are read here rather than through torchvision's CIFAR classes, which insist on the
md5 sums of the full release; torchvision is only used to download them.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from yacs.config import CfgNode

from .cifar_tensor import TensorCifarLoader
from .common import DatasetNotFoundError, IndexedDataset, crd_sampler, make_loaders

# Upstream mdistiller normalises with CIFAR-100's statistics; we use them for CIFAR-10 as well.
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR release keeps its splits and labels, and where to get it."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    url: str
    torchvision_class: str  # looked up at download time, so tests can replace it


LAYOUTS = {
    "cifar100": CifarLayout(
        "CIFAR-100", "cifar-100-python", ("train",), ("test",), "fine_labels", 100,
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100",
    ),
    "cifar10": CifarLayout(
        "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",), "labels", 10,
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "CIFAR10",
    ),
}


def _missing_files(root: str, layout: CifarLayout) -> list[str]:
    paths = [os.path.join(root, layout.folder, name) for name in layout.train_files + layout.test_files]
    return [path for path in paths if not os.path.isfile(path)]


def ensure_cifar(root: str, layout: CifarLayout, download: bool) -> None:
    """Make sure the split files exist under ``root``, downloading them if allowed."""
    missing = _missing_files(root, layout)
    if not missing:
        return
    reason = "DATASET.DOWNLOAD is False"
    if download:
        try:
            getattr(torchvision.datasets, layout.torchvision_class)(root, train=True, download=True)
        except (OSError, RuntimeError) as error:  # offline, proxy, full disk, corrupt archive
            reason = f"downloading with torchvision failed: {error!r}"
        missing = _missing_files(root, layout)
        if not missing:
            return
    raise DatasetNotFoundError(
        f"{layout.title} not found: missing {', '.join(missing)} ({reason}). Download the python "
        f"version from {layout.url} and extract it under DATASET.ROOT ({root}) so that "
        f"{os.path.join(root, layout.folder)} holds those files, or set DATASET.DOWNLOAD True on a "
        "machine with network access."
    )


def _load_batch(path: str) -> dict:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    # Files pickled by Python 2 load with str keys, ones pickled by Python 3 with bytes keys.
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}


def read_split(root: str, layout: CifarLayout, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The split's images as (N, 3, 32, 32) uint8 and its labels as (N,) int64."""
    names = layout.train_files if train else layout.test_files
    batches = [_load_batch(os.path.join(root, layout.folder, name)) for name in names]
    images = np.concatenate([batch["data"] for batch in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(batch[layout.label_key], dtype=np.int64) for batch in batches])
    return images, labels


def reduce_per_class(labels: np.ndarray, rate: float, num_classes: int) -> np.ndarray:
    """CAT-KD's data-reduction experiment: the first ``rate`` of each of the first classes."""
    kept = [np.flatnonzero(labels == c) for c in range(num_classes)]
    return np.concatenate([indices[: int(len(indices) * rate)] for indices in kept])


class CifarImages(Dataset):
    """``(transformed PIL image, label)`` pairs, as torchvision's CIFAR classes give them."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose) -> None:
        self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # HWC, what PIL expects
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def train_transform() -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def eval_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def training_split(cfg: CfgNode) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels a run trains on (CAT-KD's reduction applied), downloaded if allowed."""
    layout = LAYOUTS[cfg.DATASET.TYPE]
    ensure_cifar(cfg.DATASET.ROOT, layout, cfg.DATASET.DOWNLOAD)
    images, labels = read_split(cfg.DATASET.ROOT, layout, train=True)
    if cfg.DATASET.REDUCTION:
        kept = reduce_per_class(labels, cfg.DATASET.RESERVED_RATE, cfg.DATASET.RESERVED_CLASS_NUM)
        images, labels = images[kept], labels[kept]
    return images, labels


def cifar_class_pool(cfg: CfgNode, per_class: int, seed: int) -> torch.Tensor:
    """[C, n, 3, 32, 32]: for each class, n = min(per_class, smallest class count) training images
    from a seeded permutation of its indices, each passed once through the training transform
    (crop, flip, normalise: one frozen draw per image). Seeded apart from the run's RNG streams,
    so every rank builds the same pool and training draws stay as without it."""
    images, labels = training_split(cfg)
    num_classes = LAYOUTS[cfg.DATASET.TYPE].num_classes
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    empty = [c for c, indices in enumerate(by_class) if len(indices) == 0]
    if empty:
        raise DatasetNotFoundError(f"the class pool needs training images of every class; none of classes {empty}")
    count = min(per_class, *(len(indices) for indices in by_class))
    permutation = np.random.default_rng(seed).permutation
    dataset = CifarImages(images, labels, train_transform())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the transform's crops and flips
        return torch.stack([
            torch.stack([dataset[i][0] for i in permutation(indices)[:count]]) for indices in by_class
        ])


def cifar_loaders(
    cfg: CfgNode, device: torch.device | str | None = None
) -> tuple[DataLoader | TensorCifarLoader, DataLoader | TensorCifarLoader, int, int]:
    """``get_dataset`` for DATASET.TYPE cifar100 / cifar10; ``device`` holds the tensor pipeline's data."""
    layout = LAYOUTS[cfg.DATASET.TYPE]
    train_images, train_labels = training_split(cfg)
    test_images, test_labels = read_split(cfg.DATASET.ROOT, layout, train=False)

    if cfg.DATASET.PIPELINE == "tensor":
        seed = cfg.EXPERIMENT.SEED if cfg.EXPERIMENT.SEED >= 0 else int(torch.randint(2**62, ()))
        train_loader = TensorCifarLoader(
            train_images, train_labels, cfg.SOLVER.BATCH_SIZE, MEAN, STD, device, train=True, seed=seed
        )
        val_loader = TensorCifarLoader(test_images, test_labels, cfg.DATASET.TEST.BATCH_SIZE, MEAN, STD, device)
        return train_loader, val_loader, len(train_labels), layout.num_classes
    train_set = IndexedDataset(
        CifarImages(train_images, train_labels, train_transform()), crd_sampler(cfg, train_labels)
    )
    val_set = CifarImages(test_images, test_labels, eval_transform())
    train_loader, val_loader = make_loaders(train_set, val_set, cfg)
    return train_loader, val_loader, len(train_set), layout.num_classes
