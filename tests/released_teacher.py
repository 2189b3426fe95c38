"""Checkpoints written the way upstream's released CIFAR-100 teachers (``ckpt_epoch_240.pth``) are,
for tests: the weights under ``model`` (from DataParallel: ``module.`` keys) next to training
metadata pickled as Python objects, an ``argparse.Namespace`` of the options and numpy scalars."""
from __future__ import annotations

import argparse
import contextlib
from typing import BinaryIO, Iterator

import numpy as np
import torch

NUMPY_1_SCALAR = "numpy.core.multiarray"  # the module numpy 1.x pickles its scalars under
NUMPY_2_SCALAR = "numpy._core.multiarray"


@contextlib.contextmanager
def numpy_scalars_pickled_under(module: str) -> Iterator[None]:
    """Pickle numpy scalars with their reconstructor named ``module.scalar``, as that numpy does;
    numpy 2 still serves ``numpy.core`` (an alias for old pickles), so pickle finds it there."""
    scalar = np.float64(0).__reduce__()[0]
    saved = scalar.__module__
    scalar.__module__ = module
    try:
        yield
    finally:
        scalar.__module__ = saved


def released_checkpoint(state: dict, data_parallel: bool = True) -> dict:
    prefix = "module." if data_parallel else ""
    return {
        "epoch": 240,
        "model": {prefix + key: value for key, value in state.items()},
        "accuracy": np.float64(72.34),
        "best_acc": np.float64(72.41),
        "opt": argparse.Namespace(model="resnet8", learning_rate=0.05, lr_decay_epochs=[150, 180, 210],
                                  weight_decay=np.float32(5e-4), epochs=240, seed=np.int64(0)),
    }


def save_released_checkpoint(state: dict, f: str | BinaryIO, data_parallel: bool = True,
                             numpy_module: str = NUMPY_2_SCALAR) -> None:
    with numpy_scalars_pickled_under(numpy_module):
        torch.save(released_checkpoint(state, data_parallel), f)
