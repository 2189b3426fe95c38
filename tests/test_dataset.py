import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler

from fake_cifar import write_cifar
from mdistiller_lakd.dataset import DatasetNotFoundError, get_dataset
from mdistiller_lakd.dataset.cifar import MEAN, STD
from mdistiller_lakd.dataset.common import ContrastiveSampler
from mdistiller_lakd.engine.cfg import load_cfg


def make_cfg(root, *opts):
    return load_cfg(None, [
        "DATASET.ROOT", root, "DATASET.NUM_WORKERS", 0, "DATASET.DOWNLOAD", False,
        "SOLVER.BATCH_SIZE", 16, "DATASET.TEST.BATCH_SIZE", 8, *opts,
    ])


def read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def cifar_split(root, dataset, train):
    """The fake files' images (N, 3, 32, 32) and labels, read independently of the package."""
    if dataset == "cifar100":
        batches = [read_pickle(os.path.join(root, "cifar-100-python", "train" if train else "test"))]
        key = b"fine_labels"
    else:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        batches = [read_pickle(os.path.join(root, "cifar-10-batches-py", name)) for name in names]
        key = b"labels"
    images = np.concatenate([batch[b"data"] for batch in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([batch[key] for batch in batches])
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def to_uint8(images):
    """Undo the CIFAR normalisation."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (images * std + mean).mul(255).round().to(torch.uint8)


def crop_of(original, image):
    """(dy, dx, flipped): ``image`` is the 32x32 window at (dy, dx) of ``original`` zero-padded by 4,
    mirrored when flipped; None when no window matches."""
    windows = F.pad(original, (4, 4, 4, 4)).unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32)
    for flipped in (False, True):
        target = image.flip(-1) if flipped else image
        hits = (windows == target[:, None, None]).flatten(3).all(-1).all(0).nonzero()
        if len(hits):
            return int(hits[0, 0]), int(hits[0, 1]), flipped
    return None


def test_cifar100_batches_shapes_types_and_loader_settings(cifar100_root):
    train_loader, val_loader, num_data, num_classes = get_dataset(make_cfg(cifar100_root))
    assert (num_data, num_classes, len(train_loader), len(val_loader)) == (64, 100, 4, 4)
    image, target, index = next(iter(train_loader))
    assert image.shape == (16, 3, 32, 32) and image.dtype == torch.float32
    assert target.shape == index.shape == (16,) and target.dtype == index.dtype == torch.int64
    image, target = next(iter(val_loader))
    assert image.shape == (8, 3, 32, 32) and target.shape == (8,)
    assert isinstance(train_loader.sampler, RandomSampler)
    assert isinstance(val_loader.sampler, SequentialSampler)
    assert train_loader.pin_memory == val_loader.pin_memory == torch.cuda.is_available()


@pytest.mark.parametrize("dataset", ["cifar100", "cifar10"])
def test_val_images_decode_channel_major_with_labels(dataset, request):
    root = request.getfixturevalue(f"{dataset}_root")
    _, val_loader, _, num_classes = get_dataset(make_cfg(root, "DATASET.TYPE", dataset))
    expected_images, expected_labels = cifar_split(root, dataset, train=False)
    images, labels = map(torch.cat, zip(*val_loader))
    assert num_classes == (100 if dataset == "cifar100" else 10)
    assert torch.equal(labels, expected_labels)
    # Pixel (row 2, column 5) of the green plane sits at byte 1 * 1024 + 2 * 32 + 5 of the record.
    raw = read_pickle(os.path.join(root, *(
        ("cifar-100-python", "test") if dataset == "cifar100" else ("cifar-10-batches-py", "test_batch")
    )))[b"data"]
    assert to_uint8(images[3])[1, 2, 5] == raw[3][1 * 1024 + 2 * 32 + 5]
    assert torch.equal(to_uint8(images), expected_images)


@pytest.mark.parametrize("dataset", ["cifar100", "cifar10"])
def test_train_indices_cover_the_split_and_images_are_crops_of_their_index(dataset, request):
    root = request.getfixturevalue(f"{dataset}_root")
    train_loader, _, num_data, _ = get_dataset(make_cfg(root, "DATASET.TYPE", dataset))
    originals, labels = cifar_split(root, dataset, train=True)
    images, targets, indices = map(torch.cat, zip(*train_loader))
    assert num_data == len(originals) and torch.equal(indices.sort().values, torch.arange(num_data))
    assert torch.equal(targets, labels[indices])
    for image, index in zip(to_uint8(images), indices):
        assert crop_of(originals[index], image) is not None


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_crd_batches_carry_contrastive_indices(cifar100_root, mode):
    cfg = make_cfg(cifar100_root, "DISTILLER.TYPE", "CRD", "CRD.NCE.K", 8, "CRD.MODE", mode)
    train_loader, _, _, _ = get_dataset(cfg)
    _, labels = cifar_split(cifar100_root, "cifar100", train=True)
    image, target, index, contrastive_index = next(iter(train_loader))
    assert image.shape == (16, 3, 32, 32)
    assert contrastive_index.shape == (16, 9) and contrastive_index.dtype == torch.int64
    if mode == "exact":
        assert torch.equal(contrastive_index[:, 0], index)
    assert torch.equal(labels[contrastive_index[:, 0]], target)
    assert (labels[contrastive_index[:, 1:]] != target[:, None]).all()
    # 8 of 63 negatives: drawn without replacement.
    assert all(len(set(row.tolist())) == 8 for row in contrastive_index[:, 1:])


def upstream_contrastive_index(labels, k, mode, index):
    """Upstream mdistiller's per-class lists of positives and negatives, for comparison."""
    num_classes = labels.max() + 1
    positives = [np.flatnonzero(labels == c) for c in range(num_classes)]
    negatives = [np.concatenate([positives[j] for j in range(num_classes) if j != c])
                 for c in range(num_classes)]
    target = labels[index]
    positive = index if mode == "exact" else np.random.choice(positives[target], 1)[0]
    replace = k > len(negatives[target])
    return np.hstack(([positive], np.random.choice(negatives[target], k, replace=replace)))


@pytest.mark.parametrize("mode", ["exact", "relax"])
@pytest.mark.parametrize("k", [5, 100])  # without and with replacement (40 samples)
def test_contrastive_sampler_draws_what_upstream_draws(mode, k):
    labels = np.random.default_rng(1).integers(0, 4, size=40)
    sampler = ContrastiveSampler(labels, k, mode)
    for index in (0, 17, 39):
        np.random.seed(index)
        expected = upstream_contrastive_index(labels, k, mode, index)
        np.random.seed(index)
        assert np.array_equal(sampler(index, labels[index]), expected)


def test_unknown_crd_mode_is_named():
    with pytest.raises(ValueError, match="CRD.MODE.*'loose'"):
        ContrastiveSampler([0, 1], 4, "loose")


def test_reduction_keeps_a_share_of_the_first_classes(tmp_path):
    write_cifar(str(tmp_path), "cifar100", num_train=64, num_test=8, num_classes=4)
    cfg = make_cfg(str(tmp_path), "DATASET.REDUCTION", True, "DATASET.RESERVED_RATE", 0.5,
                   "DATASET.RESERVED_CLASS_NUM", 2)
    train_loader, _, num_data, num_classes = get_dataset(cfg)
    targets = torch.cat([batch[1] for batch in train_loader])
    assert (num_data, num_classes) == (16, 100)
    assert torch.equal(targets.bincount(), torch.tensor([8, 8]))


def test_missing_cifar_without_download_names_the_files_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        get_dataset(make_cfg(str(tmp_path)))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert os.path.join(str(tmp_path), "cifar-100-python", "train") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
    assert "DATASET.DOWNLOAD" in message


def test_failed_download_names_the_files_and_the_failure(tmp_path, monkeypatch):
    calls = []

    def offline(root, train, download):
        calls.append(root)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        get_dataset(make_cfg(str(tmp_path), "DATASET.TYPE", "cifar10", "DATASET.DOWNLOAD", True))
    message = str(info.value)
    assert calls == [str(tmp_path)]
    assert os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_1") in message
    assert "downloading with torchvision failed" in message and "no network" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message


def test_download_fills_in_missing_files(tmp_path, monkeypatch):
    def fake_download(root, train, download):
        assert download
        write_cifar(root, "cifar100", num_train=20, num_test=10)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_download)
    _, _, num_data, _ = get_dataset(make_cfg(str(tmp_path), "DATASET.DOWNLOAD", True))
    assert num_data == 20


def test_unknown_dataset_type_is_named(tmp_path):
    with pytest.raises(ValueError, match="DATASET.TYPE 'svhn'"):
        get_dataset(make_cfg(str(tmp_path), "DATASET.TYPE", "svhn"))


@pytest.fixture
def imagenet_root(tmp_path):
    """Two classes, three training and two validation PNGs each, of odd sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            os.makedirs(tmp_path / split / name)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(30 + 7 * i, 41, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    return str(tmp_path)


def test_imagenet_batches(imagenet_root):
    cfg = make_cfg(imagenet_root, "DATASET.TYPE", "imagenet", "SOLVER.BATCH_SIZE", 4)
    train_loader, val_loader, num_data, num_classes = get_dataset(cfg)
    assert (num_data, num_classes) == (6, 2)
    images, targets, indices = map(torch.cat, zip(*train_loader))
    assert images.shape == (6, 3, 224, 224) and images.dtype == torch.float32
    assert torch.equal(indices.sort().values, torch.arange(6))
    assert torch.equal(targets, (indices >= 3).long())  # cat/0..2 then dog/0..2
    images, targets = next(iter(val_loader))
    assert images.shape == (4, 3, 224, 224) and targets.tolist() == [0, 0, 1, 1]


def test_imagenet_crd_batches(imagenet_root):
    cfg = make_cfg(imagenet_root, "DATASET.TYPE", "imagenet", "DISTILLER.TYPE", "CRD", "CRD.NCE.K", 5)
    train_loader, _, _, _ = get_dataset(cfg)
    _, target, index, contrastive_index = next(iter(train_loader))
    assert contrastive_index.shape == (6, 6)
    assert torch.equal(contrastive_index[:, 0], index)
    assert ((contrastive_index[:, 1:] >= 3).long() != target[:, None]).all()


def test_missing_imagenet_folder_is_named(imagenet_root):
    os.rename(os.path.join(imagenet_root, "val"), os.path.join(imagenet_root, "validation"))
    with pytest.raises(DatasetNotFoundError, match="image-net.org") as info:
        get_dataset(make_cfg(imagenet_root, "DATASET.TYPE", "imagenet"))
    assert os.path.join(imagenet_root, "val") in str(info.value)


def test_imagenet_class_mismatch_is_named(imagenet_root):
    os.rename(os.path.join(imagenet_root, "val", "dog"), os.path.join(imagenet_root, "val", "wolf"))
    with pytest.raises(ValueError, match="class folders") as info:
        get_dataset(make_cfg(imagenet_root, "DATASET.TYPE", "imagenet"))
    assert os.path.join(imagenet_root, "val") in str(info.value)


def tensor_cfg(root, *opts):
    return make_cfg(root, "DATASET.PIPELINE", "tensor", "SOLVER.BATCH_SIZE", 24, *opts)


def test_tensor_pipeline_val_batches_equal_the_torchvision_pipeline(cifar100_root):
    _, torchvision_val, _, _ = get_dataset(make_cfg(cifar100_root))
    _, tensor_val, _, num_classes = get_dataset(tensor_cfg(cifar100_root), device="cpu")
    assert num_classes == 100 and len(list(tensor_val)) == len(tensor_val) == len(torchvision_val) == 4
    for (image, target), (expected_image, expected_target) in zip(tensor_val, torchvision_val):
        assert torch.equal(image, expected_image) and torch.equal(target, expected_target)


def test_tensor_pipeline_batches_like_the_dataloader(cifar100_root):
    train_loader, _, num_data, _ = get_dataset(tensor_cfg(cifar100_root))
    sizes = [len(batch[0]) for batch in train_loader]
    assert num_data == 64 and len(train_loader) == 3 and sizes == [24, 24, 16]  # last batch kept
    image, target, index = next(iter(train_loader))
    assert image.shape == (24, 3, 32, 32) and image.dtype == torch.float32
    assert target.dtype == index.dtype == torch.int64


def test_tensor_pipeline_crops_flips_and_covers_every_index_each_epoch(cifar100_root):
    train_loader, _, _, _ = get_dataset(tensor_cfg(cifar100_root))
    originals, labels = cifar_split(cifar100_root, "cifar100", train=True)
    crops, orders = [], []
    for epoch in range(10):
        train_loader.set_epoch(epoch)
        images, targets, indices = map(torch.cat, zip(*train_loader))
        assert torch.equal(indices.sort().values, torch.arange(64))
        assert torch.equal(targets, labels[indices])
        crops += [crop_of(originals[index], image) for image, index in zip(to_uint8(images), indices)]
        orders.append(indices)
    assert None not in crops
    shifts = torch.tensor([crop[:2] for crop in crops])
    assert sorted(set(shifts.flatten().tolist())) == list(range(9))  # every offset of padding 4
    assert 0.4 < np.mean([crop[2] for crop in crops]) < 0.6  # 640 flips of probability 1/2
    assert not torch.equal(orders[0], orders[1])  # reshuffled


def test_tensor_pipeline_same_seed_same_batches(cifar100_root):
    first, _, _, _ = get_dataset(tensor_cfg(cifar100_root, "EXPERIMENT.SEED", 3))
    second, _, _, _ = get_dataset(tensor_cfg(cifar100_root, "EXPERIMENT.SEED", 3))
    other_seed, _, _, _ = get_dataset(tensor_cfg(cifar100_root, "EXPERIMENT.SEED", 4))
    epoch_0 = list(first)
    assert not torch.equal(list(first)[0][2], epoch_0[0][2])  # without set_epoch: the next epoch
    first.set_epoch(0)
    for repeat in (list(first), list(second)):
        assert len(repeat) == len(epoch_0) == 3
        for batch, same in zip(epoch_0, repeat):
            assert all(torch.equal(a, b) for a, b in zip(batch, same))
    assert not torch.equal(next(iter(other_seed))[2], epoch_0[0][2])


@pytest.mark.parametrize("opts, named", [
    (("DISTILLER.TYPE", "CRD"), "CRD"),
    (("DATASET.TYPE", "imagenet"), "CIFAR only"),
    (("DATASET.PIPELINE", "dali"), "'dali'"),
])
def test_tensor_pipeline_refuses_what_it_cannot_do(cifar100_root, opts, named):
    with pytest.raises(ValueError, match="DATASET.PIPELINE") as info:
        get_dataset(tensor_cfg(cifar100_root, *opts))
    assert named in str(info.value)
