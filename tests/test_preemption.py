"""Stopping at a step boundary and resuming mid-epoch (engine/preemption.py, engine/resumable.py):
KD, LAKD (eager), PS-KD and HARD stopped by SIGTERM in the middle of epoch 1, or checkpointed by
SOLVER.CHECKPOINT_MINUTES and then killed, resume to the weights of the run never stopped (bit for
bit, on the CPU with DATASET.NUM_WORKERS 0); a second signal during the write; two gloo ranks
stopped by a signal to one of them; tools/train.py's exit status; the grid's executors."""
import io
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from fake_cifar import write_cifar
from mdistiller_lakd.dataset import get_dataset
from mdistiller_lakd.distillers import Vanilla
from mdistiller_lakd.engine.build import build_distiller
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint, save_checkpoint
from mdistiller_lakd.engine.preemption import REQUEUE_EXIT_STATUS, TrainingStopped
from mdistiller_lakd.engine.resumable import ResumableLoader
from mdistiller_lakd.engine.trainer import Trainer
from mdistiller_lakd.engine.utils import seed_everything
from mdistiller_lakd.grid import local
from mdistiller_lakd.grid.cells import load_grid
from mdistiller_lakd.models import cifar_model_dict
from test_distributed import free_port
from test_grid import TINY, working_directory
from test_trainer import (  # noqa: F401 (finished_run: a fixture)
    KILL_MID_EPOCH, RUN_NAME, finished_run, run_train, worklog_blocks, write_config,
)

STEPS = 3  # per epoch: 24 training images, batches of 8
METHODS = {
    "KD": ("configs/cifar100/kd/res56_res20.yaml", []),
    "LAKD": ("configs/cifar100/lakd/res56_res20.yaml", ["LAKD.LOCATIONS", [1, 2, 3], "LAKD.BACKWARD", "eager"]),
    "PSKD": ("configs/cifar100/pskd/resnet20.yaml", []),
    "HARD": ("configs/cifar100/hard/res56_res20.yaml", []),
}
# Patch run inside tools/train.py's process: SIGTERM to itself during step 2 of epoch 1.
SIGTERM_MID_EPOCH = KILL_MID_EPOCH.replace("epoch == 2", "epoch == 1").replace("SIGKILL", "SIGTERM")


class Killed(BaseException):
    """Stands in for SIGKILL inside the test process: nothing of the trainer runs after it."""


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("preemption"))
    write_cifar(os.path.join(folder, "data"), "cifar100", num_train=8 * STEPS, num_test=8)
    torch.manual_seed(1)
    save_checkpoint({"model": cifar_model_dict["resnet8"][0](num_classes=100).state_dict()},
                    os.path.join(folder, "teacher.pth"))
    return folder


def make_trainer(folder: str, method: str, run: str, *opts) -> Trainer:
    """The method's CIFAR-100 config shrunk to resnet8 on both sides, 2 epochs of STEPS steps."""
    config, method_opts = METHODS[method]
    cfg = load_cfg(config, [
        "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
        "DISTILLER.TEACHER_CKPT", os.path.join(folder, "teacher.pth"), "SOLVER.EPOCHS", 2,
        "SOLVER.BATCH_SIZE", 8, "DATASET.TEST.BATCH_SIZE", 8,
        "DATASET.ROOT", os.path.join(folder, "data"), "DATASET.DOWNLOAD", False, "DATASET.NUM_WORKERS", 0,
        "LOG.PREFIX", os.path.join(folder, method, run), "EXPERIMENT.SEED", 0, *method_opts, *opts,
    ])
    seed_everything(0)
    train_loader, val_loader, num_data, num_classes = get_dataset(cfg)
    return Trainer(method, build_distiller(cfg, num_classes, num_data), train_loader, val_loader, cfg,
                   torch.device("cpu"))


def at_step(trainer: Trainer, epoch: int, iteration: int, action) -> None:
    """Run ``action()`` at the start of the given training step (0-based iteration)."""
    train_step = trainer.train_step

    def step(batch, step_epoch, step_iteration):
        if (step_epoch, step_iteration) == (epoch, iteration):
            action()
        return train_step(batch, step_epoch, step_iteration)

    trainer.train_step = step


def latest(trainer: Trainer) -> dict:
    return load_checkpoint(os.path.join(trainer.log_path, "latest"))


def largest_difference(got, expected) -> float:
    """The largest absolute difference between the tensors of two nested checkpoint values (state
    dicts, a method's extra state, optimizer states), whose other values must be equal."""
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        return (got.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        return max((largest_difference(got[key], expected[key]) for key in expected), default=0.0)
    if isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        return max((largest_difference(a, b) for a, b in zip(got, expected)), default=0.0)
    assert got == expected
    return 0.0


@pytest.fixture(scope="module")
def uninterrupted(data_folder):
    """Each method's final `latest` and worklog, trained without a stop (computed on first use)."""
    finals = {}

    def final(method: str):
        if method not in finals:
            trainer = make_trainer(data_folder, method, "straight")
            trainer.train()
            with open(trainer.worklog_path) as f:
                finals[method] = latest(trainer), f.read()
        return finals[method]

    return final


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigterm_mid_epoch_then_resume_is_bit_identical(data_folder, uninterrupted, method):
    stopped = make_trainer(data_folder, method, "sigterm")
    at_step(stopped, 1, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingStopped, match=f"stopped by SIGTERM at epoch 1, step 2/{STEPS}"):
        stopped.train()
    state = latest(stopped)
    assert state["epoch"] == 0 and state["position"]["epoch"] == 1 and state["position"]["step"] == 2
    assert state["position"]["meters"]["loss"]["count"] == 16  # two batches of 8
    assert not os.path.exists(stopped.worklog_path) or "epoch: 1" not in open(stopped.worklog_path).read()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers go with the loop

    make_trainer(data_folder, method, "sigterm").train(resume=True)
    expected, expected_worklog = uninterrupted(method)
    got = latest(stopped)
    # Every tensor of the distiller (student, teacher, method state) and of the optimizer.
    assert largest_difference(got["model"], expected["model"]) == 0.0
    assert largest_difference(got["optimizer"], expected["optimizer"]) == 0.0
    with open(stopped.worklog_path) as f:
        assert f.read() == expected_worklog  # the epoch's meters resumed too; no epoch logged twice


class StepClock:
    """A clock that a training step advances by one minute."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("method", sorted(METHODS))
def test_clock_checkpoint_then_kill_resumes_bit_identical(data_folder, uninterrupted, method):
    trainer = make_trainer(data_folder, method, "clock", "SOLVER.CHECKPOINT_MINUTES", 2)
    clock = trainer.clock = StepClock()
    train_step = trainer.train_step

    def timed_step(batch, epoch, iteration):
        if (epoch, iteration) == (1, 2):  # after the checkpoint of step 2
            raise Killed
        clock.now += 60.0
        return train_step(batch, epoch, iteration)

    trainer.train_step = timed_step
    with pytest.raises(Killed):
        trainer.train()
    assert latest(trainer)["position"]["step"] == 2

    resumed = make_trainer(data_folder, method, "clock", "SOLVER.CHECKPOINT_MINUTES", 2)
    resumed.train(resume=True)
    assert largest_difference(latest(resumed)["model"], uninterrupted(method)[0]["model"]) == 0.0


def test_a_second_signal_during_the_write_leaves_a_checkpoint_that_loads(data_folder, monkeypatch):
    trainer = make_trainer(data_folder, "KD", "second_signal")
    at_step(trainer, 1, 0, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    real_save = torch.save

    def save_while_signalled(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled in the middle of the write below
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_while_signalled)
    with pytest.raises(TrainingStopped, match="stopped by SIGUSR1 at epoch 1, step 1/"):
        trainer.train()
    monkeypatch.undo()
    assert latest(trainer)["position"]["step"] == 1
    assert not [name for name in os.listdir(trainer.log_path) if name.endswith(".tmp")]


def test_old_end_of_epoch_checkpoints_still_resume(data_folder, uninterrupted):
    """A `latest` without a position (written at an epoch's end, as before mid-epoch checkpoints)."""
    first = make_trainer(data_folder, "KD", "old")
    first.cfg.defrost()
    first.cfg.SOLVER.EPOCHS = 1
    first.train()
    assert "position" not in latest(first)
    resumed = make_trainer(data_folder, "KD", "old")
    resumed.train(resume=True)
    assert largest_difference(latest(resumed)["model"], uninterrupted("KD")[0]["model"]) == 0.0


def test_tensor_pipeline_and_workers_resume_with_the_same_images_in_the_same_order(data_folder):
    """Every image of the interrupted epoch once, in the uninterrupted order: the tensor pipeline's
    batches (pixels too) and a DataLoader with 2 workers (indices; their augmentation is reseeded)."""
    cfg = load_cfg(None, ["DATASET.ROOT", os.path.join(data_folder, "data"), "DATASET.DOWNLOAD", False,
                          "DATASET.PIPELINE", "tensor", "SOLVER.BATCH_SIZE", 8])
    tensor_loader = get_dataset(cfg)[0]
    tensor_loader.set_epoch(3)
    whole = list(tensor_loader)
    state = tensor_loader.position_state()
    tensor_loader.resume_at(1, state)
    tensor_loader.set_epoch(3)
    rest = list(tensor_loader)
    assert len(rest) == STEPS - 1
    assert all(torch.equal(a, b) for got, want in zip(rest, whole[1:]) for a, b in zip(got, want))

    dataset = TensorDataset(torch.arange(40))
    loader = ResumableLoader(DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2))
    torch.manual_seed(0)
    order = [int(i) for (batch,) in loader for i in batch]
    state = loader.position_state()
    loader.resume_at(2, state)
    assert [int(i) for (batch,) in loader for i in batch] == order[16:]
    assert sorted(order) == list(range(40))


def _rank_worker(rank: int, port: int, folder: str, resume: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_cfg(None, ["SOLVER.BATCH_SIZE", 8, "SOLVER.EPOCHS", 2,
                              "LOG.PREFIX", folder])
        torch.manual_seed(0)
        distiller = Vanilla(cifar_model_dict["resnet8"][0](num_classes=10))
        images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(32) % 10
        train = DataLoader(TensorDataset(images, labels, torch.arange(32)), batch_size=8, shuffle=True)
        val = DataLoader(TensorDataset(images[:8], labels[:8]), batch_size=8)
        trainer = Trainer("ranks", distiller, train, val, cfg, torch.device("cpu"))
        stopped_at = []
        train_step = trainer.train_step

        def step(batch, epoch, iteration):
            stopped_at[:] = [epoch, iteration]
            if not resume and rank == 1 and (epoch, iteration) == (1, 1):
                os.kill(os.getpid(), signal.SIGTERM)  # this rank only
            return train_step(batch, epoch, iteration)

        trainer.train_step = step
        try:
            trainer.train(resume=resume)
            outcome = "finished"
        except TrainingStopped as stopped:
            outcome = str(stopped)
        torch.save({"outcome": outcome, "last_step": stopped_at, "weights": distiller.student.state_dict()},
                   os.path.join(folder, f"rank{rank}_{resume}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_stop_at_the_same_step_and_resume(tmp_path):
    def run(resume: bool) -> list[dict]:
        mp.spawn(_rank_worker, args=(free_port(), str(tmp_path), resume), nprocs=2, join=True)
        return [torch.load(str(tmp_path / f"rank{rank}_{resume}.pt")) for rank in range(2)]

    stopped = run(resume=False)
    assert stopped[0]["outcome"] == "stopped by a signal to another rank at epoch 1, step 2/4; " \
        f"{tmp_path / 'ranks' / 'latest'} holds the run there: continue it with --resume"
    assert stopped[1]["outcome"].startswith("stopped by SIGTERM at epoch 1, step 2/4")
    assert stopped[0]["last_step"] == stopped[1]["last_step"] == [1, 1]
    assert load_checkpoint(str(tmp_path / "ranks" / "latest"))["position"]["step"] == 2

    resumed = run(resume=True)
    assert [run["outcome"] for run in resumed] == ["finished", "finished"]
    assert [run["last_step"] for run in resumed] == [[2, 3], [2, 3]]
    assert all(torch.equal(value, resumed[1]["weights"][key]) for key, value in resumed[0]["weights"].items())
    assert load_checkpoint(str(tmp_path / "ranks" / "latest"))["epoch"] == 2


def test_train_py_exits_with_the_requeue_status_and_resumes(tmp_path, finished_run):
    config = write_config(str(tmp_path))
    prefix = str(tmp_path / "out")
    run_dir = os.path.join(prefix, RUN_NAME)
    stopped = run_train(config, prefix, patch=SIGTERM_MID_EPOCH)
    assert stopped.returncode == REQUEUE_EXIT_STATUS == 75, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at epoch 1, step 2/4" in stopped.stderr
    assert load_checkpoint(os.path.join(run_dir, "latest"))["position"]["step"] == 2
    resumed = run_train(config, prefix, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout and "at epoch 1, step 2" in resumed.stdout
    assert [block["epoch"] for block in worklog_blocks(run_dir)[0]] == ["1", "2"]
    expected = load_checkpoint(os.path.join(finished_run[1], "student_latest"))["model"]
    got = load_checkpoint(os.path.join(run_dir, "student_latest"))["model"]
    assert largest_difference(got, expected) == 0.0


class StoppedOnceRun:
    """Stands in for a cell's training: the first attempt at each cell stops on a signal."""

    attempts: dict = {}

    def __init__(self, cell, env=None, gpus=1):
        self.cell = cell
        StoppedOnceRun.attempts[cell.name] = StoppedOnceRun.attempts.get(cell.name, 0) + 1

    def poll(self):
        return self.wait()

    def wait(self):
        return REQUEUE_EXIT_STATUS if StoppedOnceRun.attempts[self.cell.name] == 1 else 0


def test_local_queue_restarts_a_cell_stopped_by_a_signal(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "CellRun", StoppedOnceRun)
    monkeypatch.setattr(local, "POLL_SECONDS", 0)
    StoppedOnceRun.attempts = {}
    with working_directory(tmp_path):
        cells = load_grid(TINY).cells[:2]
    out = io.StringIO()
    assert local.LocalQueue(cells, [], out).run() == {cell.name: 0 for cell in cells}
    assert StoppedOnceRun.attempts == {cell.name: 2 for cell in cells}
    assert f"stopped {cells[0].name} by a signal; restarting it from its `latest`" in out.getvalue()
    assert "2/2 done, 0 running, 0 left" in out.getvalue()


def test_slurm_checkpoint_stops_the_training_before_the_requeue(tmp_path):
    """submitit's handler calls ``checkpoint`` and then requeues: the training must have received
    SIGTERM and exited by then; the resubmitted job pickles without the process."""
    from mdistiller_lakd.grid.slurm import CellJob

    with working_directory(tmp_path):
        job = CellJob(load_grid(TINY).cells[0])
    child = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\nprint(flush=True)\n" \
            "time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    process.stdout.readline()  # its handler is installed
    job.run = type("Run", (), {"process": process})()
    resubmission = job.checkpoint()
    assert resubmission.function is job
    assert process.wait(timeout=1) == REQUEUE_EXIT_STATUS
    assert pickle.loads(pickle.dumps(job)).run is None
