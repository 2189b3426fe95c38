"""CRD end to end through tools/train.py: the memory banks get the dataset's size and are trained."""
import os
import runpy

import torch

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.engine.checkpoint import load_checkpoint
from mdistiller_lakd.models import cifar_model_dict

NUM_TRAIN = 48


def test_crd_trains_one_epoch_through_tools_train(tmp_path):
    root = str(tmp_path / "data")
    write_cifar(root, "cifar100", num_train=NUM_TRAIN, num_test=16)
    teacher_ckpt = str(tmp_path / "resnet14_teacher.pth")
    torch.manual_seed(0)
    torch.save({"model": cifar_model_dict["resnet14"][0](num_classes=100).state_dict()}, teacher_ckpt)
    config = tmp_path / "crd.yaml"
    config.write_text(
        'EXPERIMENT:\n  PROJECT: "tiny"\n  TAG: "crd,resnet14,resnet8"\n'
        f'DISTILLER:\n  TYPE: "CRD"\n  TEACHER: "resnet14"\n  STUDENT: "resnet8"\n  TEACHER_CKPT: "{teacher_ckpt}"\n'
        f'DATASET:\n  ROOT: "{root}"\n  NUM_WORKERS: 0\n  DOWNLOAD: False\n  TEST:\n    BATCH_SIZE: 16\n'
        'SOLVER:\n  BATCH_SIZE: 16\n  EPOCHS: 1\n  TRAINER: "crd"\n'
        "CRD:\n  FEAT:\n    STUDENT_DIM: 64\n    TEACHER_DIM: 64\n  NCE:\n    K: 16\n"
    )
    train = runpy.run_path(os.path.join(REPO_ROOT, "tools", "train.py"))["main"]
    assert train(["--cfg", str(config), "LOG.PREFIX", str(tmp_path / "out")]) == 0

    run_dir = tmp_path / "out" / "tiny" / "crd,resnet14,resnet8"
    state = load_checkpoint(str(run_dir / "latest"))["model"]
    assert state["contrast.memory_v1"].shape == (NUM_TRAIN, 128)  # num_data from the dataset
    # Every training sample was seen once: its bank entries are unit vectors (the random
    # initial ones are not), and the normalisation constants were fixed.
    norms = state["contrast.memory_v2"].norm(dim=1)
    assert torch.allclose(norms, torch.ones(NUM_TRAIN), atol=1e-5)
    assert (state["contrast.params"][2:4] > 0).all()
    worklog = (run_dir / "worklog.txt").read_text()
    assert "test_acc" in worklog
