"""Teacher loading: the checkpoint formats of upstream mdistiller and of this project, and the
messages for a missing file or a checkpoint of another architecture."""
import os
import runpy

import pytest
import torch

from conftest import REPO_ROOT
from mdistiller_lakd.engine.build import TeacherNotFoundError, load_teacher
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.engine.checkpoint import CheckpointError
from mdistiller_lakd.models import cifar_model_dict, imagenet_model_dict


def trained_resnet8(num_classes: int = 100) -> dict:
    torch.manual_seed(1)
    model = cifar_model_dict["resnet8"][0](num_classes=num_classes)
    with torch.no_grad():
        for buffer in model.buffers():  # BN statistics too, so that every tensor is checked
            buffer.add_(1)
    return model.state_dict()


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


# The files a teacher comes from: upstream's release (saved from DataParallel), upstream's own
# training checkpoints (the whole distiller in DataParallel), ours (student_* and latest).
FORMATS = {
    "upstream release": lambda s: {"epoch": 240, "model": prefixed(s, "module."), "accuracy": torch.tensor(73.4)},
    "upstream latest": lambda s: {
        "epoch": 240, "best_acc": 73.4, "optimizer": {"state": {}, "param_groups": []},
        "model": {**prefixed(s, "module.student."), **prefixed(s, "module.teacher.")},
    },
    "ours student": lambda s: {"model": s, "arch": "resnet8", "dataset": "cifar100"},
    "ours latest": lambda s: {"epoch": 240, "best_acc": 73.4, "model": {**prefixed(s, "student."), "teacher.x": torch.ones(1)}},
}


def teacher_cfg(path: str, teacher: str = "resnet8", *opts):
    return load_cfg(None, ["DISTILLER.TEACHER", teacher, "DISTILLER.TEACHER_CKPT", path, *opts])


@pytest.mark.parametrize("fmt", FORMATS)
def test_loads_every_checkpoint_format(tmp_path, fmt):
    state = trained_resnet8()
    path = str(tmp_path / "teacher.pth")
    torch.save(FORMATS[fmt](state), path)
    teacher = load_teacher(teacher_cfg(path), num_classes=100)
    assert not teacher.training
    loaded = teacher.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_missing_released_teacher_gives_every_remedy(tmp_path, monkeypatch):
    missing = str(tmp_path / "cifar_teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth")
    monkeypatch.setitem(cifar_model_dict, "resnet56", (cifar_model_dict["resnet56"][0], missing))
    with pytest.raises(TeacherNotFoundError) as info:  # no URL: never reaches the network
        load_teacher(teacher_cfg("", "resnet56", "DISTILLER.TEACHER_URL", ""), num_classes=100)
    message = str(info.value)
    assert missing in message and "set DISTILLER.TEACHER_URL to download" in message
    assert "cifar_teachers.tar" in message and "megvii-research/mdistiller/releases" in message
    assert "python tools/train.py --cfg configs/cifar100/vanilla/resnet56.yaml" in message
    assert "DISTILLER.TEACHER_CKPT" in message
    assert os.path.isfile(os.path.join(REPO_ROOT, "configs", "cifar100", "vanilla", "resnet56.yaml"))


def test_missing_teacher_ckpt_names_the_key_and_path(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(TeacherNotFoundError) as info:
        load_teacher(teacher_cfg(missing, "resnet56"), num_classes=100)
    assert "DISTILLER.TEACHER_CKPT" in str(info.value) and missing in str(info.value)
    assert "configs/cifar100/vanilla/resnet56.yaml" in str(info.value)


def test_wrong_architecture_names_the_mismatching_keys(tmp_path):
    path = str(tmp_path / "resnet8.pth")
    torch.save({"model": trained_resnet8()}, path)
    with pytest.raises(CheckpointError) as info:
        load_teacher(teacher_cfg(path, "resnet20"), num_classes=100)
    message = str(info.value)
    assert path in message and "'resnet20'" in message
    # resnet20 has three blocks per stage where resnet8 has one: 2 x 3 blocks of 12 entries each.
    assert "missing keys: 72 (layer1.1.conv1.weight, " in message and ", ...)" in message


def test_wrong_number_of_classes_names_the_shape(tmp_path):
    path = str(tmp_path / "resnet8.pth")
    torch.save({"model": trained_resnet8(num_classes=10)}, path)
    with pytest.raises(CheckpointError, match=r"shape mismatches: 2 \(fc.weight: \(10, 64\) in the file, \(100, 64\)"):
        load_teacher(teacher_cfg(path), num_classes=100)


def test_imagenet_teacher_without_checkpoint_is_pretrained(monkeypatch):
    calls = []
    monkeypatch.setitem(imagenet_model_dict, "ResNet34", lambda pretrained: calls.append(pretrained) or torch.nn.Linear(1, 1))
    load_teacher(teacher_cfg("", "ResNet34", "DATASET.TYPE", "imagenet"), num_classes=1000)
    assert calls == [True]


def test_train_fails_before_training_when_the_teacher_is_missing(tmp_path, cifar100_root, capsys):
    prefix = str(tmp_path / "out")
    train_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "train.py"))["main"]
    code = train_main([
        "--cfg", os.path.join(REPO_ROOT, "configs", "cifar100", "vanilla", "resnet20.yaml"),
        "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet56", "DISTILLER.TEACHER_CKPT", str(tmp_path / "t.pth"),
        "DATASET.ROOT", cifar100_root, "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", prefix,
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert "teacher checkpoint not found" in err and "Traceback" not in err
    assert not os.path.exists(prefix)  # no run folder: nothing was trained


def test_invalid_distiller_settings_become_config_errors_naming_the_method(tmp_path):
    # LAKD raises plain ValueErrors (it stays free of our config types, to go upstream as-is);
    # build_distiller turns them into ConfigErrors, which tools/train.py prints without a traceback.
    from mdistiller_lakd.engine.build import build_distiller
    from mdistiller_lakd.engine.cfg import ConfigError

    path = str(tmp_path / "teacher.pth")
    torch.save({"model": trained_resnet8()}, path)
    cfg = teacher_cfg(
        path, "resnet8", "DISTILLER.TYPE", "LAKD", "DISTILLER.STUDENT", "resnet8", "LAKD.LOCATIONS", "[2, 1, 3]"
    )
    with pytest.raises(ConfigError, match=r"^LAKD: .*LOCATIONS"):
        build_distiller(cfg, num_classes=100, num_data=64)
