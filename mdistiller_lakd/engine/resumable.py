"""Training loaders that a mid-epoch resume can restart after the batches already trained on.

A loader the trainer iterates offers, besides ``__iter__``, ``__len__`` and ``set_epoch``:
``position_state()``, what a mid-epoch checkpoint keeps to replay the current epoch's order, and
``resume_at(batches, state)``, after which the next pass (once ``set_epoch`` has chosen the epoch)
yields the rest of that order from batch ``batches`` on, without loading the images before it.
``TensorCifarLoader`` and ``distributed.GlobalBatchSplit`` implement them; a torch ``DataLoader``
gets them from ``ResumableLoader``, which records the order its sampler draws.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler


class ResumableSampler(Sampler[int]):
    """``sampler``'s indices, drawn as it draws them (RandomSampler: one seed from torch's global
    RNG per epoch, so a run's random sequence is the plain DataLoader's) and kept for the epoch."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.indices: list[int] = []  # the current epoch's order
        self.start: int | None = None  # set by resume_at: where the next pass begins in `indices`

    def __len__(self) -> int:
        return len(self.sampler)  # the whole epoch's, as the progress bar and step numbers count

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, None
        if start is None:
            self.indices = list(self.sampler)
            start = 0
        elif not self.indices:  # DistributedSampler: the order follows from its seed and epoch
            self.indices = list(self.sampler)
        return iter(self.indices[start:])

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def position_state(self) -> dict:
        """The epoch's order, unless its sampler can draw it again (DistributedSampler: seed + epoch;
        each rank draws its own share)."""
        if isinstance(self.sampler, DistributedSampler):
            return {}
        return {"indices": torch.tensor(self.indices, dtype=torch.int64)}

    def resume_at(self, start: int, state: dict) -> None:
        self.indices = state["indices"].tolist() if "indices" in state else []
        self.start = start


class ResumableLoader:
    """``loader`` rebuilt around a ``ResumableSampler`` of ``sampler`` (default: its own) with
    ``batch_size`` (default: its own); everything else as ``loader`` has it."""

    def __init__(self, loader: DataLoader, sampler: Sampler | None = None, batch_size: int | None = None) -> None:
        self.sampler = ResumableSampler(sampler if sampler is not None else loader.sampler)
        self.batch_size = batch_size or loader.batch_size
        self.loader = DataLoader(
            loader.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
            prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
        )

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        return iter(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def position_state(self) -> dict:
        return self.sampler.position_state()

    def resume_at(self, batches: int, state: dict) -> None:
        self.sampler.resume_at(batches * self.batch_size, state)


def resumable_loader(loader):
    """The training loader the trainer iterates: a ``DataLoader`` wrapped in ``ResumableLoader``,
    any other loader (which brings its own ``resume_at``) as it is."""
    return ResumableLoader(loader) if isinstance(loader, DataLoader) else loader
