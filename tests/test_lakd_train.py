"""LAKD end to end: tools/train.py with the shipped res56_res20 config on a tiny fake CIFAR-100 (a
small teacher saved here), its logs (L_k, CE, CAT, EK), a kill and resume, and tools/eval.py on the
saved student giving the run's validation accuracy."""
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.analysis.events import read_scalars
from mdistiller_lakd.analysis.runs import parse_worklog
from mdistiller_lakd.engine.checkpoint import load_checkpoint, save_checkpoint
from mdistiller_lakd.models import cifar_model_dict
from test_trainer import ANSI, KILL_MID_EPOCH

CONFIG = os.path.join("configs", "cifar100", "lakd", "res56_res20.yaml")
TEACHER = "wrn_16_2"  # small, and other widths than resnet20: the connectors are trained and saved
LOSS_KEYS = ["loss_local_1", "loss_local_2", "loss_ce", "loss_cat"]


def train(
    folder: str, resume: bool = False, patch: str = "", config: str = CONFIG
) -> tuple[subprocess.CompletedProcess, str]:
    """tools/train.py on a shipped config (LAKD's by default), shrunk by overrides; returns the
    result and run folder."""
    overrides = [
        "DISTILLER.TEACHER", TEACHER, "DISTILLER.TEACHER_CKPT", os.path.join(folder, "teacher.pth"),
        "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "16", "DATASET.TEST.BATCH_SIZE", "16",
        "LOG.SAVE_CHECKPOINT_FREQ", "1", "LOG.TENSORBOARD_FREQ", "1",
        "DATASET.ROOT", os.path.join(folder, "data"), "DATASET.DOWNLOAD", "False", "DATASET.NUM_WORKERS", "0",
        "LOG.PREFIX", os.path.join(folder, "out"),
    ]
    args = ["--cfg", config] + (["--resume"] if resume else []) + overrides
    launcher = ["tools/train.py"]
    if patch:
        launcher = ["-c", patch + "\nimport runpy\nrunpy.run_path('tools/train.py', run_name='__main__')"]
    result = subprocess.run([sys.executable, *launcher, *args], cwd=REPO_ROOT, capture_output=True, text=True)
    # The folder name holds the overrides, the checkpoint's path too: find it by its worklog.
    run_dirs = [root for root, _, files in os.walk(os.path.join(folder, "out")) if "worklog.txt" in files]
    return result, run_dirs[0] if run_dirs else ""


def prepare(folder: str) -> None:
    write_cifar(os.path.join(folder, "data"), "cifar100", num_train=64, num_test=32)
    torch.manual_seed(0)
    save_checkpoint({"model": cifar_model_dict[TEACHER][0](num_classes=100).state_dict()}, os.path.join(folder, "teacher.pth"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("lakd"))
    prepare(folder)
    result, run_dir = train(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, run_dir


def test_run_logs_local_losses_and_ek(finished_run):
    _, run_dir = finished_run
    with open(os.path.join(run_dir, "worklog.txt")) as f:
        epochs, best = parse_worklog(f.read())
    assert list(epochs) == [1, 2] and all("test_ek" in values for values in epochs.values())
    # Each L_k, CE and CAT per epoch in the worklog too, not only in tensorboard.
    assert all(f"train_{key}" in values for values in epochs.values() for key in LOSS_KEYS)
    scalars = read_scalars(os.path.join(run_dir, "train.events"))
    for key in LOSS_KEYS:
        assert len(scalars[f"train_losses/{key}"]) == 2 and f"iter/{key}" in scalars
    assert len(scalars["test_ek"]) == 2
    state = load_checkpoint(os.path.join(run_dir, "latest"))["model"]
    assert any(key.startswith("sdm.connectors.") for key in state)
    student = load_checkpoint(os.path.join(run_dir, "student_best"))
    assert set(student["model"]) == set(cifar_model_dict["resnet20"][0]().state_dict())
    assert student["ndam"] == {"locations": [1, 4, 9], "abs": True, "avg_weight": 0.3, "max_weight": 0.7}


def test_eval_of_the_saved_student_matches_the_runs_validation(finished_run, capsys):
    folder, run_dir = finished_run
    eval_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "eval.py"))["main"]
    args = ["-m", "resnet20", "-c", os.path.join(run_dir, "student_best"), "-d", "cifar100",
            "--root", os.path.join(folder, "data"), "-bs", "16", "-j", "0"]
    assert eval_main(args) == 0
    top1 = float(re.search(r"Top-1: (\d+\.\d\d)\|", ANSI.sub("", capsys.readouterr().out)).group(1))
    with open(os.path.join(run_dir, "worklog.txt")) as f:
        _, best = parse_worklog(f.read())
    assert top1 == best


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, finished_run):
    folder = str(tmp_path)
    prepare(folder)
    killed, run_dir = train(folder, patch=KILL_MID_EPOCH)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed, run_dir = train(folder, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_checkpoint(os.path.join(finished_run[1], "latest"))["model"]
    got = load_checkpoint(os.path.join(run_dir, "latest"))["model"]
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)  # student, connectors, BN
