"""Teacher loading: the checkpoint formats of upstream mdistiller and of this project, and the
messages for a missing file, a checkpoint of another architecture or one holding unsafe objects."""
import glob
import os
import re
import runpy

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from released_teacher import NUMPY_1_SCALAR, NUMPY_2_SCALAR, released_checkpoint, save_released_checkpoint
from mdistiller_lakd.engine.build import TeacherNotFoundError, load_teacher
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.engine.checkpoint import CheckpointError, load_checkpoint
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


# The files a teacher comes from: upstream's release (saved from DataParallel, or not), upstream's own
# training checkpoints (the whole distiller in DataParallel), ours (student_* and latest).
FORMATS = {
    "upstream release": released_checkpoint,
    "upstream release, no DataParallel": lambda s: released_checkpoint(s, data_parallel=False),
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


@pytest.mark.parametrize("numpy_module", [NUMPY_1_SCALAR, NUMPY_2_SCALAR])
def test_released_checkpoints_of_either_numpy_load(tmp_path, numpy_module):
    state = trained_resnet8()
    path = str(tmp_path / "ckpt_epoch_240.pth")
    save_released_checkpoint(state, path, numpy_module=numpy_module)
    # The file names the scalar reconstructor as that numpy did (else this test would repeat the other).
    assert numpy_module + ".scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["accuracy"] == np.float64(72.34) and checkpoint["accuracy"].dtype == np.float64
    assert checkpoint["opt"].seed == np.int64(0) and checkpoint["opt"].lr_decay_epochs == [150, 180, 210]
    loaded = load_teacher(teacher_cfg(path), num_classes=100).state_dict()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


class Opaque:
    """Any class of ours: unpickling an instance of a class runs that class's code."""


def test_a_checkpoint_holding_another_object_is_refused_naming_it(tmp_path):
    path = str(tmp_path / "teacher.pth")
    torch.save({**released_checkpoint(trained_resnet8()), "extra": Opaque()}, path)
    with pytest.raises(CheckpointError) as info:
        load_teacher(teacher_cfg(path), num_classes=100)
    # Only the refused global is named, not the released files' metadata (allowed, in the same file).
    assert str(info.value).startswith(f"cannot read checkpoint {path}: it holds {__name__}.Opaque, refused:")


def test_missing_released_teacher_gives_every_remedy(tmp_path, monkeypatch):
    missing = str(tmp_path / "cifar_teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth")
    monkeypatch.setitem(cifar_model_dict, "resnet56", (cifar_model_dict["resnet56"][0], missing))
    with pytest.raises(TeacherNotFoundError) as info:  # no URL: never reaches the network
        load_teacher(teacher_cfg("", "resnet56", "DISTILLER.TEACHER_URL", ""), num_classes=100)
    message = str(info.value)
    assert missing in message and "set DISTILLER.TEACHER_URL to download" in message
    assert "cifar_teachers.tar" in message
    assert "https://github.com/megvii-research/mdistiller/releases/tag/checkpoints " in message
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


@pytest.mark.parametrize("data_parallel", [True, False], ids=["DataParallel", "plain"])
def test_train_runs_with_a_released_teacher_ckpt(tmp_path, cifar100_root, data_parallel):
    state = trained_resnet8()
    path = str(tmp_path / "ckpt_epoch_240.pth")
    save_released_checkpoint(state, path, data_parallel, numpy_module=NUMPY_1_SCALAR)
    prefix = str(tmp_path / "out")
    train_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "train.py"))["main"]
    assert train_main([
        "--cfg", os.path.join(REPO_ROOT, "configs", "cifar100", "vanilla", "resnet20.yaml"),
        "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
        "DISTILLER.TEACHER_CKPT", path, "DATASET.ROOT", cifar100_root, "DATASET.NUM_WORKERS", "0",
        "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "32", "LOG.PREFIX", prefix,
    ]) == 0
    [latest] = glob.glob(os.path.join(prefix, "*", "*", "latest"))
    saved = load_checkpoint(latest)
    assert saved["epoch"] == 1
    # The run's teacher is the released one (frozen, so its weights are still those of the file).
    assert all(torch.equal(saved["model"]["teacher." + key], state[key]) for key in state)


def test_a_truncated_checkpoint_says_so(tmp_path):
    path = tmp_path / "ckpt_epoch_240.pth"
    save_released_checkpoint(trained_resnet8(), str(path))
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=f"^cannot read checkpoint {re.escape(str(path))}: .*\nIt is truncated, not a PyTorch"):
        load_checkpoint(str(path))


def test_eval_reads_a_released_checkpoint(tmp_path, cifar100_root, capsys):
    path = str(tmp_path / "ckpt_epoch_240.pth")
    save_released_checkpoint(trained_resnet8(), path, numpy_module=NUMPY_1_SCALAR)
    eval_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "eval.py"))["main"]
    assert eval_main(["-m", "resnet8", "-c", path, "--root", cifar100_root, "-j", "0"]) == 0
    assert "Top-1:" in capsys.readouterr().out
