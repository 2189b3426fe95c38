"""tools/grid.py on the shipped tiny grid (2 configs x 2 seeds, one epoch of resnet8 on a synthetic
CIFAR-100): the dry run's listing, a killed cell resumed through submitit's in-process executor (the
Slurm code path), the other cells run by the local executor, the results table, a rerun that redoes
nothing; and bad grid files, rejected before anything runs."""
import contextlib
import io
import os
import re
import runpy
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.analysis.runs import parse_worklog
from mdistiller_lakd.engine import runlock
from mdistiller_lakd.engine.cfg import ConfigError, load_cfg
from mdistiller_lakd.engine.checkpoint import save_checkpoint
from mdistiller_lakd.grid import local
from mdistiller_lakd.engine.preemption import REQUEUE_EXIT_STATUS
from mdistiller_lakd.grid.cells import EXIT_FILE, LOG_FILE, SKIP, TRAIN_SCRIPT, cell_state, load_grid, train_command
from mdistiller_lakd.engine.utils import experiment_name
from mdistiller_lakd.grid.local import LocalQueue, visible_gpus
from mdistiller_lakd.models import cifar_model_dict

grid_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "grid.py"))["main"]
TINY = os.path.join(REPO_ROOT, "configs", "grids", "tiny.yaml")
KILLED = "cifar100_baselines/kd,resnet56,resnet20,seed1"  # the cell the fixture kills
# Runs tools/train.py, killing it (SIGKILL: no cleanup) right after its last epoch's checkpoints,
# before it writes the worklog's closing best_acc line.
KILL_AFTER_EPOCH = f"""
import os, runpy, signal
from mdistiller_lakd.engine.trainer import Trainer
train_epoch = Trainer.train_epoch
def dying_epoch(self, epoch):
    train_epoch(self, epoch)
    os.kill(os.getpid(), signal.SIGKILL)
Trainer.train_epoch = dying_epoch
runpy.run_path({TRAIN_SCRIPT!r}, run_name="__main__")
"""


@contextlib.contextmanager
def working_directory(path: str):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def call_grid(*args: str) -> tuple[int, str, str]:
    """tools/grid.py's main in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = grid_main(list(args))
    return status, out.getvalue(), err.getvalue()


def listed_actions(listing: str) -> dict[str, str]:
    """{cell name: action} of a dry run's listing."""
    return {match.group(2): match.group(1)
            for match in re.finditer(r"^  (run|resume|skip|running)\s+(\S+)", listing, re.M)}


def table_rows(output: str) -> list[list[str]]:
    rows = [line for line in output.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


def latest_mtimes(grid) -> dict[str, int]:
    return {cell.name: os.stat(os.path.join(cell.run_dir, "latest")).st_mtime_ns for cell in grid.cells}


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """The tiny grid in a fresh working directory, step by step: dry run, one cell killed, that
    cell through the Slurm path, the rest through the local queue, a rerun. Returns each step's output."""
    folder = str(tmp_path_factory.mktemp("grid"))
    write_cifar(os.path.join(folder, "data"), "cifar100", num_train=64, num_test=32)
    torch.manual_seed(0)
    teacher = cifar_model_dict["resnet8"][0](num_classes=100)
    save_checkpoint({"model": teacher.state_dict()}, os.path.join(folder, "teacher.pth"))
    steps = {}
    with working_directory(folder):
        grid = steps["grid"] = load_grid(TINY)
        steps["dry_run_fresh"] = call_grid(TINY, "--dry-run")

        killed = next(cell for cell in grid.cells if cell.name == KILLED)
        steps["kill"] = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH, *killed.train_args(resume=False)],
                                       capture_output=True, text=True)
        with open(os.path.join(killed.run_dir, "worklog.txt")) as f:
            steps["worklog_when_killed"] = f.read()
        steps["dry_run_killed"] = call_grid(TINY, "--dry-run")
        steps["command_when_killed"] = train_command(killed)

        # A grid of the killed cell alone, run by a Slurm job (submitit's in-process executor).
        with open(TINY) as f:
            one_cell = f.read().replace("seeds: [0, 1]", "seeds: [1]").replace(
                "  - configs/cifar100/vanilla/resnet20.yaml\n", "")
        with open("one_cell.yaml", "w") as f:
            f.write(one_cell)
        steps["slurm"] = call_grid("one_cell.yaml", "--executor", "slurm", "--cluster", "debug", "--wait")

        steps["local"] = call_grid(TINY)
        steps["mtimes"] = latest_mtimes(grid)
        steps["rerun"] = call_grid(TINY)
        steps["mtimes_after_rerun"] = latest_mtimes(grid)
    return steps


def test_dry_run_lists_every_cell_and_what_it_needs(tiny_grid):
    status, listing, _ = tiny_grid["dry_run_fresh"]
    assert status == 0
    assert listed_actions(listing) == {
        f"cifar100_baselines/{tag},seed{seed}": "run" for tag in ("vanilla,resnet20", "kd,resnet56,resnet20")
        for seed in (0, 1)
    }
    assert "4 cells (2 configs x 2 seeds)" in listing
    assert "4 to run, 0 to resume, 0 to skip, 0 running" in listing
    # Each cell's run folder is named by the config's tag and the seed; the overrides are in its config.yaml.
    assert re.search(r"kd,resnet56,resnet20,seed1\s+output/grids/tiny/cifar100_baselines/kd,resnet56,resnet20,seed1$",
                     listing, re.M)
    assert "DISTILLER.STUDENT" not in listing


def test_a_killed_cell_is_resumed_through_the_slurm_path(tiny_grid):
    assert tiny_grid["kill"].returncode == -9
    epochs, best = parse_worklog(tiny_grid["worklog_when_killed"])
    assert list(epochs) == [1] and best is None
    status, listing, _ = tiny_grid["dry_run_killed"]
    assert listed_actions(listing)[KILLED] == "resume"
    assert "(1/1 epochs logged)" in listing
    assert "--resume" in tiny_grid["command_when_killed"]

    status, out, _ = tiny_grid["slurm"]
    assert status == 0, out
    assert "submitted 1 of 1 cells" in out
    killed = next(cell for cell in tiny_grid["grid"].cells if cell.name == KILLED)
    with open(os.path.join(killed.run_dir, LOG_FILE)) as f:
        log = f.read()
    assert "Resuming" in log and "after epoch 1" in log
    assert "Took over the lock of" in log  # the killed run's lock: its process is gone
    with open(os.path.join(killed.run_dir, "worklog.txt")) as f:
        epochs_now, best_now = parse_worklog(f.read())
    assert epochs_now == epochs  # epoch 1 kept as the killed run logged it, not trained again
    assert best_now == epochs[1]["test_acc"]


def test_local_queue_runs_the_rest_and_prints_the_table(tiny_grid):
    status, out, err = tiny_grid["local"]
    assert status == 0, out + err
    assert "1 of 4 cells finished already; running the other 3" in out
    assert re.search(r"^\[grid\] 4/4 done, 0 running, 0 left \| elapsed \d+:\d\d:\d\d \| all done$", out, re.M)
    assert len(re.findall(r"^\[grid\] run ", out, re.M)) == 3
    assert all(cell_state(cell).action == SKIP for cell in tiny_grid["grid"].cells)

    # One row per method, its two seeds together.
    assert [(row[1], row[2], row[5], row[9]) for row in table_rows(out)] == [
        ("resnet8", "vanilla", "2", "done"), ("resnet8 → resnet8", "KD", "2", "done"),
    ]


def test_a_rerun_redoes_nothing(tiny_grid):
    status, out, _ = tiny_grid["rerun"]
    assert status == 0
    assert "4 of 4 cells finished already; running the other 0" in out
    assert not re.search(r"^\[grid\] (run|resume) ", out, re.M)
    assert tiny_grid["mtimes_after_rerun"] == tiny_grid["mtimes"]
    assert len(table_rows(out)) == 2


def test_report_averages_the_seeds_of_the_grids_runs(tiny_grid):
    """--report on the finished grid, its runs' final best accuracies set by hand (synthetic data
    leaves them all near 0): mean ± sample std over the seeds, and KD's gain over the student."""
    finals = {"vanilla,resnet20,seed0": 10.0, "vanilla,resnet20,seed1": 20.0,
              "kd,resnet56,resnet20,seed0": 30.0, "kd,resnet56,resnet20,seed1": 50.0}
    for cell in tiny_grid["grid"].cells:
        path = os.path.join(cell.run_dir, "worklog.txt")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(re.sub(r"^best_acc\t.*$", f"best_acc\t{finals[cell.name.split('/')[1]]:.2f}", text, flags=re.M))
    with working_directory(tiny_grid["grid"].cells[0].workdir):
        status, out, _ = call_grid(TINY, "--report")
    assert status == 0
    rows = table_rows(out)
    assert [(row[2], row[6], row[8]) for row in rows] == [
        ("vanilla", "15.00 ± 7.07", ""), ("KD", "40.00 ± 14.14", "+25.00"),
    ]


def test_report_lists_missing_cells_by_name(tmp_path):
    with working_directory(tmp_path):
        status, out, _ = call_grid(TINY, "--report")
    assert status == 1
    assert "missing (4: no epoch finished)" in out
    assert "  cifar100_baselines/kd,resnet56,resnet20,seed0" in out


def test_report_tells_a_cell_stopped_by_a_signal_from_a_failed_one(tmp_path):
    with working_directory(tmp_path):
        cells = load_grid(TINY).cells
        for cell, status in zip(cells, (REQUEUE_EXIT_STATUS, 1)):
            os.makedirs(cell.run_dir)
            save_checkpoint({"epoch": 0}, os.path.join(cell.run_dir, "latest"))
            with open(os.path.join(cell.run_dir, EXIT_FILE), "w") as exit_file:
                exit_file.write(f"{status}\n")
        assert cell_state(cells[0]).detail == "0/1 epochs logged, last attempt stopped by a signal, resumes where it stopped"
        status, out, _ = call_grid(TINY, "--report")
    assert status == 1
    stopped, failed = out.split("stopped by a signal, to resume (1):\n")[1].split("failed (1):\n")
    assert stopped.strip().startswith(cells[0].name) and failed.strip().startswith(f"{cells[1].name}: exit status 1")


def test_without_submitit_slurm_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    monkeypatch.delitem(sys.modules, "mdistiller_lakd.grid.slurm", raising=False)
    with working_directory(tmp_path):
        status, _, err = call_grid(TINY, "--executor", "slurm")
    assert status == 2
    assert 'pip install -e ".[slurm]"' in err


class InstantRun:
    """Stands in for a cell's training: done at its second poll, its GPU noted."""

    def __init__(self, cell, env=None, gpus=1):
        self.cell, self.gpu, self.polls = cell, env["CUDA_VISIBLE_DEVICES"], 0

    def poll(self):
        self.polls += 1
        return 0 if self.polls > 1 else None

    def wait(self):
        return 0


def test_local_queue_runs_one_cell_per_gpu_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "CellRun", InstantRun)
    monkeypatch.setattr(local, "POLL_SECONDS", 0)
    with working_directory(tmp_path):
        cells = load_grid(TINY).cells
    out = io.StringIO()
    assert LocalQueue(cells, ["2", "5"], out).run() == {cell.name: 0 for cell in cells}
    events = re.findall(r"^\[grid\] (run \S+ on GPU \d|finished \S+|\d/4 done, \d running, \d left)", out.getvalue(), re.M)
    names = [cell.name for cell in cells]
    assert events == [
        "0/4 done, 0 running, 4 left",
        f"run {names[0]} on GPU 2", "0/4 done, 1 running, 3 left",
        f"run {names[1]} on GPU 5", "0/4 done, 2 running, 2 left",
        f"finished {names[0]}", "1/4 done, 1 running, 2 left",
        f"finished {names[1]}", "2/4 done, 0 running, 2 left",
        f"run {names[2]} on GPU 2", "2/4 done, 1 running, 1 left",
        f"run {names[3]} on GPU 5", "2/4 done, 2 running, 0 left",
        f"finished {names[2]}", "3/4 done, 1 running, 0 left",
        f"finished {names[3]}", "4/4 done, 0 running, 0 left",
    ]


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1,4")
    assert visible_gpus() == ["3", "1", "4"]
    assert visible_gpus(2) == ["3", "1"]
    assert visible_gpus(0) == []  # the CPU
    with pytest.raises(ConfigError, match="--gpus 4: only 3 GPU"):
        visible_gpus(4)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Stand-ins for Slurm's srun and sbatch (which keeps a copy of the script it is given, returned)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "submitted.sh"


def test_slurm_options_reach_the_job_array(tmp_path, fake_slurm):
    with working_directory(tmp_path):
        status, out, err = call_grid(TINY, "--executor", "slurm", "--partition", "gpu", "--time", "1:30:00",
                                     "--constraint", "a100", "--gpus", "2", "--slurm-arg", "account=proj",
                                     "--array-parallelism", "3")
    assert status == 0, err
    assert "submitted 4 of 4 cells" in out
    assert "job 4242_0: cifar100_baselines/vanilla,resnet20,seed0" in out
    script = fake_slurm.read_text()
    for line in ("--partition=gpu", "--time=90", "--constraint=a100", "--gpus-per-node=2", "--account=proj",
                 "--array=0-3%3"):
        assert f"#SBATCH {line}\n" in script


def test_slurm_time_limits_in_minutes():
    from mdistiller_lakd.grid.slurm import minutes

    assert [minutes(text) for text in ("90", "1:30:00", "2-01:00:00", "0:00:30")] == [90, 90, 2940, 1]


def test_a_requeued_job_runs_the_same_cell_again():
    from mdistiller_lakd.grid.slurm import CellJob

    cell = load_grid(TINY).cells[0]
    job = CellJob(cell)
    resubmission = job.checkpoint()
    assert resubmission.function is job and resubmission.args == ()


BAD_GRIDS = {
    "unknown config": ("configs: [configs/cifar100/kd/res56_res20.yaml, configs/cifar100/nope/*.yaml]\nseeds: [0]\n",
                       "configs[1] 'configs/cifar100/nope/*.yaml': no config file matches it"),
    "unknown override": ("configs: [configs/cifar100/kd/res56_res20.yaml]\nseeds: [0]\nopts: [SOLVER.EPOCH, 2]\n",
                         "opts: command-line override: unknown config key 'SOLVER.EPOCH'"),
    "unknown variant key": ("configs: [configs/cifar100/lakd/res56_res20.yaml]\nseeds: [0]\n"
                            "variants:\n  default: []\n  no_detach: [LAKD.DETACHED, False]\n",
                            "variants.no_detach: command-line override: unknown config key 'LAKD.DETACHED'"),
    "empty seeds": ("configs: [configs/cifar100/kd/res56_res20.yaml]\nseeds: []\n", "seeds: give a non-empty list"),
    "shared run folder": ("configs: [configs/cifar100/kd/res56_res20.yaml, configs/cifar100/kd/*.yaml]\nseeds: [0]\n",
                          "configs[0] 'configs/cifar100/kd/res56_res20.yaml' (configs/cifar100/kd/res56_res20.yaml, "
                          "seed 0) and configs[1] 'configs/cifar100/kd/*.yaml' (configs/cifar100/kd/res56_res20.yaml, "
                          "seed 0) would share the run folder"),
    "seed set by opts": ("configs: [configs/cifar100/kd/res56_res20.yaml]\nseeds: [0]\nopts: [EXPERIMENT.SEED, 3]\n",
                         "opts: EXPERIMENT.SEED is set by the grid's `seeds`"),
    "unknown grid key": ("configs: [configs/cifar100/kd/res56_res20.yaml]\nseed: [0]\n", "unknown key 'seed'"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_grids_are_rejected_naming_the_entry(tmp_path, case):
    text, message = BAD_GRIDS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with working_directory(tmp_path):
        status, out, err = call_grid(str(path), "--dry-run")
    assert status == 2 and out == ""
    assert err.startswith(f"error: {path}: ") and message in err, err
    assert not (tmp_path / "output").exists()


def test_a_locked_cell_shows_as_running_and_nothing_starts_it(tmp_path, monkeypatch, fake_slurm):
    """A cell whose folder's lock is held (here by this live process) is left to its holder: listed
    as running, reported as running, not queued locally, not submitted, and a job of it starts nothing."""
    from mdistiller_lakd.grid import slurm

    monkeypatch.setattr(local, "CellRun", InstantRun)
    monkeypatch.setattr(local, "POLL_SECONDS", 0)
    with working_directory(tmp_path):
        grid = load_grid(TINY)
        held = grid.cells[1]
        runlock.acquire(held.run_dir)
        status, listing, _ = call_grid(TINY, "--dry-run")
        assert status == 0
        assert listed_actions(listing) == {cell.name: "running" if cell is held else "run" for cell in grid.cells}
        assert f"(pid {os.getpid()} on host {socket.gethostname()}, started " in listing
        assert "3 to run, 0 to resume, 0 to skip, 1 running" in listing

        out = io.StringIO()
        assert set(LocalQueue(grid.cells, ["0"], out).run()) == {cell.name for cell in grid.cells if cell is not held}
        assert "0 of 4 cells finished already, 1 running in another process (left to it); running the other 3" in (
            out.getvalue())

        status, out, _ = call_grid(TINY, "--executor", "slurm")
        assert status == 0 and "submitted 3 of 4 cells" in out and held.name not in out
        assert re.search(r"^#SBATCH --array=0-2(%\d+)?$", fake_slurm.read_text(), re.M)  # 3 jobs
        monkeypatch.setattr(slurm, "CellRun", None)  # calling it would fail the test
        assert slurm.CellJob(held)() == 0

        _, report_out, _ = call_grid(TINY, "--report")
        assert f"running (1):\n  {held.name}: pid {os.getpid()} on host" in report_out


def test_cell_folders_are_named_by_tag_variant_and_seed(tmp_path):
    (tmp_path / "variants.yaml").write_text(
        "configs: [configs/cifar100/lakd/res56_res20.yaml]\nseeds: [1]\nopts: [SOLVER.EPOCHS, 1]\n"
        "variants:\n  default: []\n  no_detach: [LAKD.DETACH, False]\n")
    (tmp_path / "one_variant.yaml").write_text(
        "configs: [configs/cifar100/kd/res56_res20.yaml, configs/cifar100/vanilla/resnet20.yaml]\nseeds: [0, 2]\n"
        "variants:\n  t2: [KD.TEMPERATURE, 2]\n")
    with working_directory(tmp_path):
        variants, one_variant = load_grid("variants.yaml"), load_grid("one_variant.yaml")
    assert [cell.run_name for cell in variants.cells] == [
        "cifar100_baselines/lakd,resnet56,resnet20,seed1", "cifar100_baselines/lakd,resnet56,resnet20,no_detach,seed1"]
    assert [cell.run_name for cell in one_variant.cells] == [
        "cifar100_baselines/kd,resnet56,resnet20,seed0", "cifar100_baselines/kd,resnet56,resnet20,seed2",
        "cifar100_baselines/vanilla,resnet20,seed0", "cifar100_baselines/vanilla,resnet20,seed2"]
    cell = variants.cells[1]
    assert cell.run_dir == os.path.join(str(tmp_path), "output", "grids", "variants", cell.run_name)
    # train.py writes that folder; every setting goes on its command line (and so into its config.yaml).
    args = cell.train_args(resume=False)
    assert args[args.index("--name") + 1] == cell.run_name
    assert ["LAKD.DETACH", "False", "EXPERIMENT.SEED", "1"] == args[-6:-2]


FINISHED_WORKLOG = ("-" * 25 + "\nepoch: 1\nlr: 0.05\ntrain_acc: 5.00\ntrain_loss: 4.00\ntest_acc: 12.50\n"
                    "test_acc_top5: 30.00\ntest_loss: 4.50\n" + "-" * 25 + "\nbest_acc\t12.50\n")


def test_cells_run_under_the_old_folder_names_are_found_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "CellRun", InstantRun)
    monkeypatch.setattr(local, "POLL_SECONDS", 0)
    with working_directory(tmp_path):
        cell = load_grid(TINY).cells[2]
        cfg = load_cfg(cell.config, cell.opts)
        old = os.path.join(load_grid(TINY).output, experiment_name(cfg, list(cell.opts)))
        assert "DISTILLER.STUDENT:resnet8" in old  # the long name train.py gives from the overrides
        os.makedirs(old)
        (tmp_path / old / "worklog.txt").write_text(FINISHED_WORKLOG)
        (tmp_path / old / "config.yaml").write_text(cfg.dump())
        grid = load_grid(TINY)
        found = grid.cells[2]
        assert found.name == cell.name and found.run_dir == old
        assert listed_actions(call_grid(TINY, "--dry-run")[1])[cell.name] == "skip"
        assert cell.name not in LocalQueue(grid.cells, [], io.StringIO()).run()
        _, out, _ = call_grid(TINY, "--report")
    assert [(row[2], row[6]) for row in table_rows(out) if row[2] == "KD"] == [("KD", "12.50")]
    assert "missing (3: no epoch finished)" in out and cell.name not in out.split("missing")[1]
