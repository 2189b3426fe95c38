"""The teacherless methods end to end: PS-KD's prediction buffer on two gloo ranks, and
tools/train.py runs of USKD and PS-KD (no teacher checkpoint anywhere) killed mid-epoch and resumed
to the uninterrupted result, then evaluated with tools/eval.py and tabulated with tools/compare.py
against the same student trained alone."""
import os
import re
import runpy
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.analysis.runs import group_runs, read_run, summary_rows
from mdistiller_lakd.distillers import PSKD
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint
from mdistiller_lakd.engine.trainer import Trainer
from mdistiller_lakd.models import cifar_model_dict
from test_distributed import free_port
from test_trainer import ANSI, KILL_MID_EPOCH, run_train

NUM_DATA, NUM_CLASSES = 16, 10
# Each rank's sample indices per step; the ranks' batch sizes differ (padding of the all-gather).
RANK_INDICES = [[[0, 1, 2, 3], [4, 5]], [[8, 9, 10], [11, 12, 13, 14]]]


def _pskd_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_cfg(None, ["DISTILLER.TYPE", "PSKD", "SOLVER.BATCH_SIZE", 8, "SOLVER.EPOCHS", 2,
                              "LOG.PREFIX", os.path.join(out_dir, "logs")])
        torch.manual_seed(rank)  # the trainer starts every rank from rank 0's weights
        student = cifar_model_dict["resnet8"][0](num_classes=NUM_CLASSES)
        distiller = PSKD(student, None, cfg, num_data=NUM_DATA, num_classes=NUM_CLASSES)
        images = torch.randn(NUM_DATA, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(NUM_DATA) % NUM_CLASSES
        data = DataLoader(TensorDataset(images, labels, torch.arange(NUM_DATA)), batch_size=8)
        trainer = Trainer("pskd", distiller, data, data, cfg, torch.device("cpu"))
        own_rows = {}
        for step, indices in enumerate(RANK_INDICES[rank]):
            index = torch.tensor(indices)
            logits, _, _ = trainer.train_step((images[index], labels[index], index), epoch=1, iteration=step)
            own_rows.update(zip(indices, F.softmax(logits.float(), dim=1)))
        torch.save({"predictions": distiller.predictions, "own_rows": own_rows,
                    "ignored_by_ddp": "predictions" in trainer.model.parameters_to_ignore},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_pskd_ranks_end_with_the_same_buffer_holding_every_ranks_rows(tmp_path):
    mp.spawn(_pskd_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(str(tmp_path / f"rank{r}.pt")) for r in range(2)]
    assert torch.equal(ranks[0]["predictions"], ranks[1]["predictions"])
    assert all(result["ignored_by_ddp"] for result in ranks)  # no 20 MB re-broadcast at each forward
    buffer = ranks[0]["predictions"]
    written = {i for steps in RANK_INDICES for indices in steps for i in indices}
    for result in ranks:
        for i, row in result["own_rows"].items():
            torch.testing.assert_close(buffer[i], row)
    unwritten = [i for i in range(NUM_DATA) if i not in written]
    assert buffer[unwritten].abs().sum() == 0


# --------------------------------------------------------------------------------------------------
# tools/train.py


def write_config(folder: str, method: str) -> str:
    """A shipped teacherless config shrunk to a tiny run of resnet8 on a fake CIFAR-100; a missing
    teacher checkpoint is named, and must be ignored."""
    root = os.path.join(folder, "data")
    if not os.path.isdir(root):
        write_cifar(root, "cifar100", num_train=48, num_test=16)
    base = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", method.lower(), "resnet20.yaml"), [
        "EXPERIMENT.TAG", f"{method.lower()},resnet8", "DISTILLER.STUDENT", "resnet8",
        "DISTILLER.TEACHER_CKPT", os.path.join(folder, "no_such_teacher.pth"),
        "DATASET.ROOT", root, "DATASET.NUM_WORKERS", 0, "DATASET.DOWNLOAD", False, "DATASET.TEST.BATCH_SIZE", 16,
        "SOLVER.BATCH_SIZE", 16, "SOLVER.EPOCHS", 2, "LOG.SAVE_CHECKPOINT_FREQ", 1, "LOG.TENSORBOARD_FREQ", 1,
    ])
    path = os.path.join(folder, f"{method}.yaml")
    with open(path, "w") as f:
        f.write(base.dump())
    return path


def run_dir(prefix: str) -> str:
    return next(root for root, _, files in os.walk(prefix) if "worklog.txt" in files)


@pytest.fixture(scope="module", params=["USKD", "PSKD"])
def finished_and_resumed(request, tmp_path_factory):
    """(method, uninterrupted run folder, killed-then-resumed run folder, data root)."""
    folder = str(tmp_path_factory.mktemp(request.param.lower()))
    config = write_config(folder, request.param)
    finished = run_train(config, os.path.join(folder, "full"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    killed = run_train(config, os.path.join(folder, "killed"), patch=KILL_MID_EPOCH)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_train(config, os.path.join(folder, "killed"), resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return request.param, run_dir(os.path.join(folder, "full")), run_dir(os.path.join(folder, "killed")), \
        os.path.join(folder, "data")


def test_a_resumed_teacherless_run_ends_bit_exactly_as_the_uninterrupted_one(finished_and_resumed):
    method, full, resumed, _ = finished_and_resumed
    expected = load_checkpoint(os.path.join(full, "latest"))["model"]
    got = load_checkpoint(os.path.join(resumed, "latest"))["model"]
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    extra = {"USKD": "weak_head.weight", "PSKD": "predictions"}[method]
    assert extra in expected and not any(key.startswith("teacher.") for key in expected)
    if method == "PSKD":  # every training sample was written at least once, each row a distribution
        torch.testing.assert_close(expected["predictions"].sum(1), torch.ones(48))
    student = load_checkpoint(os.path.join(full, "student_best"))["model"]
    assert set(student) == set(cifar_model_dict["resnet8"][0]().state_dict())
    with open(os.path.join(full, "worklog.txt")) as f:
        worklog = f.read()
    assert f"train_loss_{method.lower()}" in worklog and "test_ek" not in worklog


def test_eval_and_compare_handle_teacherless_runs(finished_and_resumed, capsys, tmp_path):
    method, full, _, data = finished_and_resumed
    eval_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "eval.py"))["main"]
    for checkpoint in ("student_best", "latest"):  # the distiller's checkpoint holds extra state
        assert eval_main(["-m", "resnet8", "-c", os.path.join(full, checkpoint), "--root", data,
                          "-bs", "16", "-j", "0"]) == 0
    assert re.search(r"Top-1: \d+\.\d\d", ANSI.sub("", capsys.readouterr().out))

    run = read_run(full)
    assert (run.method, run.teacher, run.student) == (method, None, "resnet8")
    # The same student trained alone: its config with DISTILLER.TYPE NONE (the worklog reused).
    scratch = str(tmp_path / "vanilla")
    os.makedirs(scratch)
    shutil.copy(os.path.join(full, "worklog.txt"), scratch)
    cfg = load_cfg(os.path.join(full, "config.yaml"), ["DISTILLER.TYPE", "NONE"])
    (tmp_path / "vanilla" / "config.yaml").write_text(cfg.dump())
    rows = summary_rows(group_runs([run, read_run(scratch)]))
    by_method = {row["method"]: row for row in rows}
    assert by_method[method]["teacher"] == "" and by_method[method]["delta_best"] == 0.0
