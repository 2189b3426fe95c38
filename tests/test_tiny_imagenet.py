"""Tiny-ImageNet: the loaders on a small tree in the archive's layout (both val/ layouts), the model
zoo against upstream's parameter names and shapes, and one KD+DOT epoch through tools/train.py."""
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from mdistiller_lakd.dataset import DatasetNotFoundError, get_dataset, normalization
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint, save_checkpoint
from mdistiller_lakd.export import NUM_CLASSES, example_images
from mdistiller_lakd.models import tiny_imagenet_model_dict

CLASSES = ["n01443537", "n01629819", "n01641577"]  # a few of the 200; the index is the sorted folder order
TRAIN_PER_CLASS, VAL_PER_CLASS = 2, 2
CONTRACT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mdistiller_tiny_imagenet_models.json")


def write_jpeg(path: str, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def write_tiny_imagenet(root: str, official_val: bool) -> str:
    """``root/tiny-imagenet-200`` as the archive unzips (train/<wnid>/images/<wnid>_<i>.JPEG), val/
    as unzipped (images/ + val_annotations.txt) or sorted into class folders."""
    base = os.path.join(root, "tiny-imagenet-200")
    annotations = []
    for c, wnid in enumerate(CLASSES):
        for i in range(TRAIN_PER_CLASS):
            write_jpeg(os.path.join(base, "train", wnid, "images", f"{wnid}_{i}.JPEG"), seed=100 * c + i)
        for i in range(VAL_PER_CLASS):
            name = f"val_{i * len(CLASSES) + (len(CLASSES) - 1 - c)}.JPEG"  # file order differs from class order
            folder = ["images"] if official_val else [wnid, "images"]
            write_jpeg(os.path.join(base, "val", *folder, name), seed=1000 + 100 * c + i)
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    if official_val:
        with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
            f.writelines(sorted(annotations))
    return root


def tiny_cfg(root: str, *opts):
    return load_cfg(None, ["DATASET.TYPE", "tiny_imagenet", "DATASET.ROOT", root, "DATASET.NUM_WORKERS", 0,
                           "SOLVER.BATCH_SIZE", 4, "DATASET.TEST.BATCH_SIZE", 4, *opts])


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory):
    return {official: write_tiny_imagenet(str(tmp_path_factory.mktemp(f"official{official}")), official)
            for official in (False, True)}


def test_both_val_layouts_give_the_same_validation_set(both_layouts):
    results = {}
    for official, root in both_layouts.items():
        train_loader, val_loader, num_data, num_classes = get_dataset(tiny_cfg(root))
        assert (num_data, num_classes) == (len(CLASSES) * TRAIN_PER_CLASS, 200)
        image, target, index = next(iter(train_loader))
        assert image.shape == (4, 3, 64, 64) and index.dtype == torch.int64
        results[official] = [(image, target) for image, target in val_loader]
    rearranged, annotated = results[False], results[True]
    assert torch.cat([t for _, t in annotated]).tolist() == [c for c in range(len(CLASSES)) for _ in range(VAL_PER_CLASS)]
    for (image_a, target_a), (image_b, target_b) in zip(rearranged, annotated):
        assert torch.equal(target_a, target_b) and torch.equal(image_a, image_b)
    # Upstream's normalisation: the first pixel of the first image, by hand.
    first = np.asarray(Image.open(os.path.join(both_layouts[False], "tiny-imagenet-200", "val", CLASSES[0], "images",
                                               "val_2.JPEG")))[0, 0] / 255.0
    mean, std = normalization("tiny_imagenet")
    assert torch.allclose(rearranged[0][0][0, :, 0, 0], torch.tensor((first - mean) / std, dtype=torch.float32), atol=1e-6)


def test_crd_draws_contrastive_indices_from_other_classes(both_layouts):
    train_loader = get_dataset(tiny_cfg(both_layouts[True], "DISTILLER.TYPE", "CRD", "CRD.NCE.K", 5))[0]
    dataset = train_loader.dataset
    _, target, index, contrastive = dataset[3]
    assert contrastive[0] == index == 3 and len(contrastive) == 6
    assert all(dataset.dataset.targets[i] != target for i in contrastive[1:])


def test_missing_dataset_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"tiny-imagenet-200/train.*tiny-imagenet-200\.zip"):
        get_dataset(tiny_cfg(str(tmp_path)))


@pytest.mark.parametrize("name", ["ResNet18", "MobileNetV2", "ShuffleV2"])
def test_models_have_upstreams_parameters_and_run_at_64x64(name):
    with open(CONTRACT) as f:
        expected = json.load(f)[name]
    model = tiny_imagenet_model_dict[name][0](num_classes=200).eval()
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == expected
    assert list(model.state_dict()) == list(expected)  # upstream's order too
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 200)
    assert feats["pooled_feat"].shape == (2, {"ResNet18": 512, "MobileNetV2": 1280, "ShuffleV2": 1024}[name])


def test_teacher_location_is_upstreams():
    path = tiny_imagenet_model_dict["ResNet18"][1]
    assert path == os.path.join(REPO_ROOT, "download_ckpts", "tiny_imagenet_teachers", "ResNet18_vanilla", "ti_res18")


def test_kd_dot_trains_one_epoch_on_the_archive_layout(both_layouts, tmp_path, capsys):
    torch.manual_seed(0)
    teacher_path = str(tmp_path / "ti_res18")
    save_checkpoint({"model": tiny_imagenet_model_dict["ResNet18"][0](num_classes=200).state_dict()}, teacher_path)
    prefix = str(tmp_path / "out")
    args = ["--cfg", "configs/tiny_imagenet/dot/r18_mv2.yaml", "DATASET.ROOT", both_layouts[True],
            "DATASET.NUM_WORKERS", 0, "DATASET.TEST.BATCH_SIZE", 6, "SOLVER.BATCH_SIZE", 6, "SOLVER.EPOCHS", 1,
            "DISTILLER.TEACHER_CKPT", teacher_path, "LOG.PREFIX", prefix, "EXPERIMENT.SEED", 0]
    result = subprocess.run([sys.executable, "tools/train.py", *map(str, args)], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_name,) = os.listdir(os.path.join(prefix, "dot_tinyimagenet"))  # upstream's project; tag and overrides
    run_dir = os.path.join(prefix, "dot_tinyimagenet", run_name)
    with open(os.path.join(run_dir, "worklog.txt")) as f:
        worklog = f.read()
    assert "epoch: 1" in worklog and "train_loss_kd" in worklog and "best_acc" in worklog
    state = load_checkpoint(os.path.join(run_dir, "latest"))
    buffers = state["optimizer"]["state"][0]
    assert {"momentum_buffer", "momentum_kd_buffer"} <= set(buffers)
    assert load_checkpoint(os.path.join(run_dir, "student_latest"))["dataset"] == "tiny_imagenet"
    # tools/eval.py reads the student back on the same validation set.
    evaluate = runpy.run_path(os.path.join(REPO_ROOT, "tools", "eval.py"))["main"]
    assert evaluate(["-m", "MobileNetV2", "-c", os.path.join(run_dir, "student_latest"), "-d", "tiny_imagenet",
                     "--root", both_layouts[True], "-bs", "6", "-j", "0"]) == 0
    test_acc = next(line.split()[1] for line in worklog.splitlines() if line.startswith("test_acc:"))
    assert f"Top-1: {test_acc}" in capsys.readouterr().out


def test_export_knows_the_image_size_and_classes():
    assert example_images("tiny_imagenet", 2).shape == (2, 3, 64, 64)
    assert NUM_CLASSES["tiny_imagenet"] == 200
