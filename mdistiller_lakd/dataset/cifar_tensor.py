"""DATASET.PIPELINE "tensor": a CIFAR split held as one uint8 tensor, augmented a whole batch at once.

The augmentation is the torchvision pipeline's (RandomCrop(32, padding=4) with black padding, a
horizontal flip with probability 1/2, ToTensor, Normalize) without per-image Python or PIL, so the
data can live on the GPU and batches cost a few kernel launches.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

PAD = 4
SIZE = 32


def random_crop_and_flip(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Per image, the SIZE x SIZE window at ``shifts`` (top, left) of the zero-padded uint8 image,
    mirrored where ``flips``; one gather for the whole batch."""
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    steps = torch.arange(SIZE, device=images.device)
    rows = shifts[:, :1] + steps
    cols = shifts[:, 1:] + torch.where(flips[:, None], SIZE - 1 - steps, steps)
    batch = torch.arange(len(images), device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


class TensorCifarLoader:
    """Batches ``(image, target, index)`` for training (shuffled, cropped, flipped), ``(image, target)``
    in order for validation; the last batch may be short, as with the DataLoader.

    The training order and augmentation of an epoch come from a CPU ``torch.Generator`` seeded with
    ``seed + epoch``, so runs repeat on any device. Call ``set_epoch`` before iterating, as with
    DistributedSampler; without it each pass moves on to the next epoch by itself. ``resume_at``
    starts the next pass after the batches a stopped run trained on (engine/resumable.py).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        device: torch.device | str | None = None,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        self.images = torch.from_numpy(images).to(device)  # (N, 3, 32, 32) uint8
        self.labels = torch.from_numpy(labels).to(device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.skip_batches = 0  # of the next training pass (resume_at)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1).to(self.images.device)
        self.std = torch.tensor(std).view(1, 3, 1, 1).to(self.images.device)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def position_state(self) -> dict:
        return {"seed": self.seed}  # drawn at random for a negative EXPERIMENT.SEED

    def resume_at(self, batches: int, state: dict) -> None:
        self.seed = state["seed"]
        self.skip_batches = batches

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # The same float32 operations as ToTensor + Normalize, hence the same values.
        return images.float().div(255).sub(self.mean).div(self.std)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        num_data, device = len(self.labels), self.images.device
        if not self.train:
            for start in range(0, num_data, self.batch_size):
                window = slice(start, start + self.batch_size)
                yield self.normalize(self.images[window]), self.labels[window]
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(num_data, generator=generator).to(device)
        shifts = torch.randint(0, 2 * PAD + 1, (num_data, 2), generator=generator).to(device)
        flips = (torch.rand(num_data, generator=generator) < 0.5).to(device)
        first, self.skip_batches = self.skip_batches * self.batch_size, 0
        for start in range(first, num_data, self.batch_size):
            window = slice(start, start + self.batch_size)
            index = order[window]
            images = random_crop_and_flip(self.images[index], shifts[window], flips[window])
            yield self.normalize(images), self.labels[index], index
