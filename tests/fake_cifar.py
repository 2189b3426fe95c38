"""Small CIFAR files in the real on-disk layout (python pickles), for tests.

The layout is the one the CIFAR authors distribute and torchvision downloads:
``cifar-100-python/{train,test,meta}`` and ``cifar-10-batches-py/{data_batch_1..5,test_batch,
batches.meta}``, each a pickled dict with byte-string keys and ``data`` as an (N, 3072) uint8 array
laid out channel-major (R plane, G plane, B plane, each 32x32 row-major).
"""
from __future__ import annotations

import os
import pickle

import numpy as np


def _dump(path: str, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(
    root: str,
    dataset: str = "cifar100",
    num_train: int = 64,
    num_test: int = 32,
    num_classes: int | None = None,
    seed: int = 0,
) -> str:
    """Write random images with labels ``i % num_classes`` under ``root``; returns the data folder."""
    rng = np.random.default_rng(seed)
    num_classes = num_classes or (100 if dataset == "cifar100" else 10)

    def split(n: int) -> tuple[np.ndarray, list[int]]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return data, [i % num_classes for i in range(n)]

    if dataset == "cifar100":
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for name, n in (("train", num_train), ("test", num_test)):
            data, labels = split(n)
            _dump(os.path.join(folder, name), {
                b"data": data,
                b"fine_labels": labels,
                b"coarse_labels": [label % 20 for label in labels],
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": name.encode(),
            })
        _dump(os.path.join(folder, "meta"), {
            b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
        })
    elif dataset == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        per_batch = [num_train // 5 + (1 if i < num_train % 5 else 0) for i in range(5)]
        for i, n in enumerate(per_batch, start=1):
            data, labels = split(n)
            _dump(os.path.join(folder, f"data_batch_{i}"), {b"data": data, b"labels": labels})
        data, labels = split(num_test)
        _dump(os.path.join(folder, "test_batch"), {b"data": data, b"labels": labels})
        _dump(os.path.join(folder, "batches.meta"), {
            b"label_names": [f"class_{i}".encode() for i in range(10)],
        })
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    return folder
