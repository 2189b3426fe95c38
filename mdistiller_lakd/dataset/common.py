"""Pieces the CIFAR and ImageNet loaders share: the missing-data error, sample indices, CRD sampling."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from yacs.config import CfgNode


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing; the message names the expected paths and how to get them there."""


class ContrastiveSampler:
    """CRD's contrastive indices for one training sample: a positive first, then ``k`` negatives.

    Follows upstream mdistiller's ``CIFAR100InstanceSample``: the positive is the sample itself
    ("exact") or a random sample of its class ("relax"); the negatives are drawn from the samples of
    every other class, with replacement only when ``k`` exceeds their number (or always, as upstream
    does for ImageNet). Instead of upstream's per-class lists of negatives (1000 x 1.28M indices on
    ImageNet) the indices are kept once, sorted by class; a draw ``r`` among the negatives of class
    ``c`` is the ``r``-th entry of that order with class ``c``'s block skipped, which is the same
    element upstream's list holds at ``r``, so the same numpy random state gives the same indices.
    """

    def __init__(
        self, labels: Sequence[int], k: int, mode: str = "exact", always_replace: bool = False
    ) -> None:
        if mode not in ("exact", "relax"):
            raise ValueError(f"CRD.MODE must be 'exact' or 'relax', got {mode!r}")
        labels = np.asarray(labels, dtype=np.int64)
        self.k = k
        self.mode = mode
        self.always_replace = always_replace
        self.by_class = np.argsort(labels, kind="stable")
        self.class_size = np.bincount(labels)
        self.class_start = np.cumsum(self.class_size) - self.class_size

    def __call__(self, index: int, target: int) -> np.ndarray:
        start, size = self.class_start[target], self.class_size[target]
        if self.mode == "exact":
            positive = index
        else:
            positive = self.by_class[start + np.random.choice(size, 1)[0]]
        num_negatives = len(self.by_class) - size
        replace = self.always_replace or self.k > num_negatives
        draws = np.random.choice(num_negatives, self.k, replace=replace)
        negatives = self.by_class[np.where(draws < start, draws, draws + size)]
        return np.concatenate(([positive], negatives)).astype(np.int64)


class IndexedDataset(Dataset):
    """A training set's ``(image, target)`` with the sample index added, and CRD's indices if given."""

    def __init__(self, dataset: Dataset, contrastive: ContrastiveSampler | None = None) -> None:
        self.dataset = dataset
        self.contrastive = contrastive

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        image, target = self.dataset[index]
        if self.contrastive is None:
            return image, target, index
        return image, target, index, self.contrastive(index, target)


def crd_sampler(cfg: CfgNode, labels: Sequence[int], always_replace: bool = False) -> ContrastiveSampler | None:
    """The contrastive sampler when the distiller is CRD (k = CRD.NCE.K, CRD.MODE), else None."""
    if cfg.DISTILLER.TYPE != "CRD":
        return None
    return ContrastiveSampler(labels, cfg.CRD.NCE.K, cfg.CRD.MODE, always_replace)


def make_loaders(train_set: Dataset, val_set: Dataset, cfg: CfgNode) -> tuple[DataLoader, DataLoader]:
    """Upstream's loaders: training shuffled at SOLVER.BATCH_SIZE, validation in order."""
    common = dict(num_workers=cfg.DATASET.NUM_WORKERS, pin_memory=torch.cuda.is_available())
    train_loader = DataLoader(train_set, batch_size=cfg.SOLVER.BATCH_SIZE, shuffle=True, **common)
    val_loader = DataLoader(val_set, batch_size=cfg.DATASET.TEST.BATCH_SIZE, shuffle=False, **common)
    return train_loader, val_loader
