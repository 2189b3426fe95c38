"""The training engine: tools/train.py and tools/eval.py end to end on a tiny CIFAR-100, kill and
resume, non-finite losses, schedules, timings, and the teacher metrics."""
import os
import re
import runpy
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.distillers import Distiller, Vanilla
from mdistiller_lakd.engine.cfg import ConfigError, load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint
from mdistiller_lakd.engine.metrics import extracurricular_knowledge, top1_agreement
from mdistiller_lakd.engine.trainer import NonFiniteLossError, Trainer
from mdistiller_lakd.engine.utils import learning_rate

EPOCHS = 2
RUN_NAME = os.path.join("tiny", "vanilla,resnet8")  # EXPERIMENT.PROJECT / EXPERIMENT.TAG
CHECKPOINTS = ["latest", "best", "student_latest", "student_best", "epoch_1", "epoch_2", "student_1", "student_2"]
WORKLOG_KEYS = ["epoch", "lr", "train_acc", "train_loss", "test_acc", "test_acc_top5", "test_loss"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Patches run inside the training process before tools/train.py, to kill it (SIGKILL: no cleanup)
# at a chosen moment of epoch 2: in its middle, or with its `latest` written to the temporary file
# but not yet moved into place (every other file of the epoch, and its worklog block, written).
KILL_MID_EPOCH = """
import os, signal
from mdistiller_lakd.engine.trainer import Trainer
train_step = Trainer.train_step
def dying_step(self, batch, epoch, iteration):
    if epoch == 2 and iteration == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return train_step(self, batch, epoch, iteration)
Trainer.train_step = dying_step
"""
KILL_BEFORE_LATEST = """
import os, signal
replace = os.replace
def dying_replace(src, dst):
    if os.path.basename(dst) == "latest" and os.path.exists(dst):
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)
os.replace = dying_replace
"""


def write_config(folder) -> str:
    root = os.path.join(folder, "data")
    write_cifar(root, "cifar100", num_train=64, num_test=32)
    path = os.path.join(folder, "resnet8.yaml")
    with open(path, "w") as f:
        f.write(
            f'EXPERIMENT:\n  PROJECT: "tiny"\n  TAG: "vanilla,resnet8"\n  SEED: 0\n'
            f'DISTILLER:\n  TYPE: "NONE"\n  STUDENT: "resnet8"\n'
            f'DATASET:\n  ROOT: "{root}"\n  NUM_WORKERS: 0\n  DOWNLOAD: False\n  TEST:\n    BATCH_SIZE: 16\n'
            f"SOLVER:\n  BATCH_SIZE: 16\n  EPOCHS: {EPOCHS}\n  LR: 0.05\n  WEIGHT_DECAY: 0.0005\n"
            f"LOG:\n  SAVE_CHECKPOINT_FREQ: 1\n  TENSORBOARD_FREQ: 3\n"
        )
    return path


def run_train(config: str, prefix: str, resume: bool = False, patch: str = "") -> subprocess.CompletedProcess:
    # LOG.PREFIX as an override: it must stay out of the run's folder name.
    args = ["--cfg", config] + (["--resume"] if resume else []) + ["LOG.PREFIX", prefix]
    launcher = ["tools/train.py"]
    if patch:
        launcher = ["-c", patch + "\nimport runpy\nrunpy.run_path('tools/train.py', run_name='__main__')"]
    return subprocess.run([sys.executable, *launcher, *args], cwd=REPO_ROOT, capture_output=True, text=True)


def worklog_blocks(run_dir: str) -> tuple[list[dict], str]:
    """The worklog's per-epoch blocks as {key: text value}, and its final best_acc line."""
    with open(os.path.join(run_dir, "worklog.txt")) as f:
        text = f.read()
    blocks = [
        dict(line.split(": ", 1) for line in chunk.strip().splitlines())
        for chunk in re.findall(r"-{25}\n(.*?)-{25}\n", text, re.S)
    ]
    return blocks, text.rstrip("\n").splitlines()[-1]


def event_tags(folder: str) -> set:
    """Scalar tags in the tensorboard event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            pos += 12 + length + 4
    return tags


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("run"))
    config = write_config(folder)
    prefix = os.path.join(folder, "out")
    result = run_train(config, prefix)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, os.path.join(prefix, RUN_NAME)


def test_run_writes_upstream_layout(finished_run):
    _, run_dir = finished_run
    for name in CHECKPOINTS + ["worklog.txt", "train.events", "config.yaml"]:
        assert os.path.exists(os.path.join(run_dir, name)), name
    saved = load_cfg(os.path.join(run_dir, "config.yaml"))
    assert saved.DISTILLER.STUDENT == "resnet8" and saved.LOG.PREFIX == os.path.dirname(os.path.dirname(run_dir))
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]

    blocks, last_line = worklog_blocks(run_dir)
    # Upstream's keys in upstream's order, the CMI of the validation outputs, then the mean of each
    # loss term (Vanilla's "ce").
    assert [list(block) for block in blocks] == [WORKLOG_KEYS + ["test_cmi", "train_ce"]] * EPOCHS
    assert all(re.fullmatch(r"\d+\.\d{4}", block["test_cmi"]) for block in blocks)
    assert [block["epoch"] for block in blocks] == ["1", "2"]
    assert blocks[0]["lr"] == "0.05"
    best = max(float(block["test_acc"]) for block in blocks)
    assert last_line == f"best_acc\t{best:.2f}"

    latest = load_checkpoint(os.path.join(run_dir, "latest"))
    assert latest["epoch"] == EPOCHS and set(latest) >= {"model", "optimizer", "best_acc", "rng"}
    assert load_checkpoint(os.path.join(run_dir, "epoch_1"))["epoch"] == 1
    student = load_checkpoint(os.path.join(run_dir, "student_best"))
    assert student["arch"] == "resnet8" and student["dataset"] == "cifar100"
    assert set(student["model"]) == {key[len("student."):] for key in latest["model"]}

    tags = event_tags(os.path.join(run_dir, "train.events"))
    assert {"train_acc", "train_loss", "test_acc", "test_acc_top5", "test_loss", "lr"} <= tags
    assert {"train_losses/ce", "iter/ce", "iter/loss", "iter/lr", "time/data"} <= tags


def test_eval_reports_the_best_accuracy(finished_run, capsys):
    folder, run_dir = finished_run
    eval_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "eval.py"))["main"]
    args = ["-m", "resnet8", "-c", os.path.join(run_dir, "student_best"), "-d", "cifar100",
            "--root", os.path.join(folder, "data"), "-bs", "16", "-j", "0"]
    assert eval_main(args) == 0
    top1 = re.search(r"Top-1: (\d+\.\d\d)\|", ANSI.sub("", capsys.readouterr().out)).group(1)
    _, last_line = worklog_blocks(run_dir)
    assert last_line == f"best_acc\t{top1}"


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, finished_run):
    config = write_config(str(tmp_path))
    prefix = str(tmp_path / "out")
    run_dir = os.path.join(prefix, RUN_NAME)
    for resume, patch in ((False, KILL_MID_EPOCH), (True, KILL_BEFORE_LATEST)):
        killed = run_train(config, prefix, resume=resume, patch=patch)
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert load_checkpoint(os.path.join(run_dir, "latest"))["epoch"] == 1

    resumed = run_train(config, prefix, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    blocks, _ = worklog_blocks(run_dir)
    assert [block["epoch"] for block in blocks] == ["1", "2"]  # epoch 2 was logged before the 2nd kill
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]
    for name in CHECKPOINTS:
        load_checkpoint(os.path.join(run_dir, name))
    # Same weights as the run that was never interrupted: model, optimizer and RNG states restored.
    expected = load_checkpoint(os.path.join(finished_run[1], "student_latest"))["model"]
    got = load_checkpoint(os.path.join(run_dir, "student_latest"))["model"]
    assert all(torch.equal(got[key], expected[key]) for key in expected)


# --------------------------------------------------------------------------------------------------
# In-process: a linear model on 3x4x4 images, so that each test takes a fraction of a second.


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)), {}


def loaders(num_train: int = 32, batch_size: int = 8):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(num_train, 3, 4, 4, generator=generator)
    targets = torch.arange(num_train) % 10
    train = DataLoader(TensorDataset(images, targets, torch.arange(num_train)), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(images[:16], targets[:16]), batch_size=batch_size)
    return train, val


def tiny_trainer(tmp_path, distiller, *opts) -> Trainer:
    cfg = load_cfg(None, ["SOLVER.EPOCHS", 2, "LOG.PREFIX", str(tmp_path), "LOG.SAVE_CHECKPOINT_FREQ", 1, *opts])
    return Trainer("tiny", distiller, *loaders(), cfg)


class NaNAtEpoch2(Vanilla):
    def forward_train(self, image, target, epoch, **kwargs):
        logits, losses = super().forward_train(image, target)
        losses["loss_kd"] = logits.sum() * (float("nan") if epoch == 2 else 0.0)
        return logits, losses


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    trainer = tiny_trainer(tmp_path, NaNAtEpoch2(TinyNet()))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "epoch 2, iteration 1/4" in message and "loss_kd=nan" in message and "ce=" not in message
    assert os.path.join(str(tmp_path), "tiny", "latest") in message
    latest = load_checkpoint(os.path.join(str(tmp_path), "tiny", "latest"))
    assert latest["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in latest["model"].values())


class SlowLoader:
    """Batches that each take 5 time units to arrive, on the trainer's clock."""

    def __init__(self, loader, clock):
        self.loader, self.clock = loader, clock

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.clock.now += 5.0
            yield batch


class FakeClock:
    now = 0.0

    def __call__(self):
        return self.now


def test_data_time_is_the_wait_for_the_batch(tmp_path):
    clock = FakeClock()
    student = TinyNet()
    student.register_forward_hook(lambda *args: setattr(clock, "now", clock.now + 1.0))  # a step takes 1
    trainer = tiny_trainer(tmp_path, Vanilla(student))
    trainer.clock = clock
    trainer.train_loader = SlowLoader(trainer.train_loader, clock)
    meters = trainer.train_pass(epoch=1)
    assert meters["data_time"].avg == 5.0 and meters["data_time"].count == 4
    assert meters["train_time"].avg == 1.0


@pytest.mark.parametrize("scheduler, expected", [
    ("step", {1: 0.05, 150: 0.05, 151: 0.005, 181: 0.0005, 211: 0.00005, 240: 0.00005}),
    ("linear", {1: 0.05, 121: 0.025, 240: 0.05 / 240}),
    ("cosine", {1: 0.05, 61: 0.05 * (0.5 + 0.5 ** 0.5 / 2), 121: 0.025, 181: 0.05 * (0.5 - 0.5 ** 0.5 / 2)}),
])
def test_learning_rate_schedules(scheduler, expected):
    cfg = load_cfg(None, ["SOLVER.SCHEDULER", scheduler])  # LR 0.05, 240 epochs, x0.1 at 150/180/210
    assert {epoch: learning_rate(cfg, epoch) for epoch in expected} == pytest.approx(expected)


def test_trainer_applies_schedule_and_nesterov(tmp_path):
    trainer = tiny_trainer(tmp_path, Vanilla(TinyNet()), "SOLVER.SCHEDULER", "cosine", "SOLVER.NESTEROV", True)
    trainer.train_epoch(2)
    group = trainer.optimizer.param_groups[0]
    assert group["nesterov"] and group["lr"] == pytest.approx(learning_rate(trainer.cfg, 2))


def test_unknown_scheduler_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="SOLVER.SCHEDULER"):
        tiny_trainer(tmp_path, Vanilla(TinyNet()), "SOLVER.SCHEDULER", "poly")


def test_resume_without_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(str(tmp_path), "tiny", "latest"))):
        tiny_trainer(tmp_path, Vanilla(TinyNet())).train(resume=True)


class CountingTeacher(TinyNet):
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class CrossEntropyDistiller(Distiller):
    def forward_train(self, image, target, **kwargs):
        logits, _ = self.student(image)
        return logits, {"loss_ce": F.cross_entropy(logits, target)}


def test_teacher_metrics_logged_with_predictions_computed_once(tmp_path):
    teacher = CountingTeacher()
    trainer = tiny_trainer(tmp_path, CrossEntropyDistiller(TinyNet(), teacher))
    trainer.train()
    assert teacher.calls == 2  # two validation batches, in the first epoch only
    blocks, _ = worklog_blocks(os.path.join(str(tmp_path), "tiny"))
    assert [list(block)[-3:] for block in blocks] == [["test_ek", "test_agreement", "train_loss_ce"]] * 2


def test_extracurricular_knowledge_and_agreement():
    target = torch.tensor([0, 1, 2, 3, 4])
    teacher = torch.tensor([0, 1, 0, 0, 0])  # wrong on 2, 3, 4
    student = torch.tensor([0, 2, 2, 3, 1])  # right on 0, 2, 3
    assert extracurricular_knowledge(student, teacher, target) == pytest.approx(200 / 3)
    assert top1_agreement(student, teacher) == pytest.approx(20.0)
    assert extracurricular_knowledge(target, target, target) == 0.0


def test_wandb_unavailable_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.warns(UserWarning, match="LOG.WANDB") as warned:
        trainer = tiny_trainer(tmp_path, Vanilla(TinyNet()), "LOG.WANDB", True, "SOLVER.EPOCHS", 1)
        trainer.train()
    assert len([w for w in warned if "LOG.WANDB" in str(w.message)]) == 1
    assert load_checkpoint(os.path.join(str(tmp_path), "tiny", "latest"))["epoch"] == 1
