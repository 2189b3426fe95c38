"""One training process per run folder (engine/runlock.py): a second tools/train.py on a held folder
stops at once naming the holder while the first finishes untouched; a lock left by a dead process of
this host is taken over; one of another host is refused with a message that says it cannot be checked."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from mdistiller_lakd.analysis.runs import parse_worklog
from mdistiller_lakd.engine import runlock

TRAIN = os.path.join(REPO_ROOT, "tools", "train.py")
CONFIG = os.path.join(REPO_ROOT, "configs", "cifar100", "vanilla", "resnet20.yaml")
# Runs tools/train.py, its first epoch waiting until the file named by HOLD_UNTIL exists.
HELD_RUN = f"""
import os, runpy, time
from mdistiller_lakd.engine.trainer import Trainer
train_epoch = Trainer.train_epoch
def held_epoch(self, epoch):
    while not os.path.exists(os.environ["HOLD_UNTIL"]):
        time.sleep(0.05)
    train_epoch(self, epoch)
Trainer.train_epoch = held_epoch
runpy.run_path({TRAIN!r}, run_name="__main__")
"""


def overrides(root: str, prefix: str) -> list[str]:
    return ["DISTILLER.STUDENT", "resnet8", "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "32",
            "DATASET.ROOT", root, "DATASET.DOWNLOAD", "False", "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", prefix]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(run_dir: str, host: str, pid: int) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(runlock.lock_path(run_dir), "w") as f:
        json.dump({"host": host, "pid": pid, "started": "2026-01-01 00:00:00 UTC"}, f)


def test_a_second_trainer_on_a_held_folder_stops_naming_the_holder(cifar100_root, tmp_path):
    prefix, release = str(tmp_path / "out"), str(tmp_path / "go")
    run_dir = os.path.join(prefix, "cifar100_baselines", "vanilla,resnet20,seed")
    args = ["--cfg", CONFIG, "--name", os.path.relpath(run_dir, prefix), *overrides(cifar100_root, prefix)]
    first = subprocess.Popen([sys.executable, "-c", HELD_RUN, *args], env={**os.environ, "HOLD_UNTIL": release},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while runlock.read_holder(run_dir) is None and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runlock.read_holder(run_dir).pid == first.pid
        for resume in ([], ["--resume"]):
            second = subprocess.run([sys.executable, TRAIN, *resume, *args], capture_output=True, text=True)
            assert second.returncode == 2
            assert (f"error: run folder {run_dir} is in use by another training process: pid {first.pid} on host "
                    f"{socket.gethostname()}, started ") in second.stderr
            assert "Traceback" not in second.stderr and "CONFIG" not in second.stdout  # stopped before any work
        open(release, "w").close()
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    with open(os.path.join(run_dir, "worklog.txt")) as f:
        epochs, best = parse_worklog(f.read())
    assert list(epochs) == [1] and best is not None  # one run's worklog, complete
    assert out.count("Run folder: ") == 1
    assert not os.path.exists(runlock.lock_path(run_dir))  # released at the end


def test_a_failed_run_releases_its_lock(cifar100_root, tmp_path):
    prefix = str(tmp_path / "out")
    result = subprocess.run([sys.executable, TRAIN, "--cfg", CONFIG, "--resume", "--name", "run",
                             *overrides(cifar100_root, prefix)], capture_output=True, text=True)
    assert result.returncode == 2 and "no checkpoint to resume from" in result.stderr
    assert os.path.isdir(os.path.join(prefix, "run")) and not os.path.exists(runlock.lock_path(os.path.join(prefix, "run")))


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    pid = dead_pid()
    write_lock(run_dir, socket.gethostname(), pid)
    lock = runlock.acquire(run_dir)
    assert runlock.read_holder(run_dir) == lock.holder and lock.holder.pid == os.getpid()
    assert f"Took over the lock of {run_dir} from pid {pid} on host {socket.gethostname()}" in capsys.readouterr().out
    lock.release()
    assert os.listdir(run_dir) == []  # the folder was there before: kept


def test_an_exited_holder_not_yet_reaped_is_stale(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    while runlock._proc_stat(process.pid)[:1] != ["Z"]:  # exited; the zombie stays until wait()
        time.sleep(0.05)
    try:
        assert runlock.LockHolder(socket.gethostname(), process.pid, "?").is_stale()
    finally:
        process.wait()


def test_a_pid_reused_by_a_later_process_is_stale():
    me = runlock.LockHolder.this_process()
    assert me.process_start and not me.is_stale()
    assert runlock.LockHolder(me.host, me.pid, me.started, process_start="1").is_stale()


def test_a_lock_of_another_host_is_refused_saying_it_cannot_be_checked(tmp_path):
    run_dir = str(tmp_path / "run")
    write_lock(run_dir, "node-17", dead_pid())
    with pytest.raises(runlock.RunFolderLockedError) as info:
        runlock.acquire(run_dir)
    message = str(info.value)
    assert f"run folder {run_dir} is in use by another training process: pid " in message
    assert "on host node-17, started 2026-01-01 00:00:00 UTC" in message
    assert "cannot be checked from here: if no such process runs on node-17, delete the lock file" in message
    assert runlock.lock_path(run_dir) in message
    assert runlock.read_holder(run_dir).host == "node-17"  # left as it was


def test_release_leaves_a_lock_taken_over_by_another(tmp_path):
    run_dir = str(tmp_path / "run")
    lock = runlock.acquire(run_dir)
    write_lock(run_dir, "node-17", 42)
    lock.release()
    assert runlock.read_holder(run_dir).host == "node-17"


def test_release_removes_the_folders_the_lock_made_while_they_stay_empty(tmp_path):
    """A run stopped before training (a teacher missing, a download failing) leaves no folder."""
    prefix = tmp_path / "out"
    runlock.acquire(str(prefix / "project" / "run")).release()
    assert os.listdir(tmp_path) == []
    lock = runlock.acquire(str(prefix / "project" / "run"))
    (prefix / "project" / "run" / "worklog.txt").write_text("epoch: 1\n")
    lock.release()
    assert os.listdir(prefix / "project" / "run") == ["worklog.txt"]
