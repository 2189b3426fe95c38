"""Multi-process training on the CPU (gloo, 127.0.0.1): two ranks end with identical weights and
average their gradients exactly as DDP would, for DDP-wrapped distillers and for LAKD's eager mode
(local backward inside the forward); each rank's share of the data; torchrun end to end; and the
per-epoch data order a resumed run must repeat."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.dataset import TensorCifarLoader
from mdistiller_lakd.distillers import Vanilla, distiller_dict
from mdistiller_lakd.engine import distributed
from mdistiller_lakd.engine.cfg import ConfigError, load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint
from mdistiller_lakd.engine.trainer import Trainer
from mdistiller_lakd.models import cifar_model_dict

NUM_CLASSES = 10
RANKS = 2
STEPS = 3
PER_RANK = 4  # images per rank and step
# name -> (DISTILLER.TYPE, extra config); LAKD's student is cut at resnet20's default [1, 4, 9].
SCENARIOS = {
    "vanilla": ("NONE", []),
    "lakd_eager": ("LAKD", ["LAKD.BACKWARD", "eager"]),
    "lakd_joint": ("LAKD", ["LAKD.BACKWARD", "joint"]),
    # DOT: two backward passes over one forward, each gradient set averaged (the task one is left)
    "kd_dot": ("KD", ["SOLVER.TRAINER", "dot"]),
}
# Also trained across ranks by tests/test_cuda.py (NCCL): a baseline, which DDP wraps.
CUDA_SCENARIOS = {"kd": ("KD", []), "lakd_eager": SCENARIOS["lakd_eager"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scenario_cfg(name: str, prefix: str):
    method, opts = {**SCENARIOS, **CUDA_SCENARIOS}[name]
    return load_cfg(None, ["DISTILLER.TYPE", method, "DISTILLER.STUDENT", "resnet20", "LOG.PREFIX", prefix,
                           "SOLVER.BATCH_SIZE", RANKS * PER_RANK, *opts])


def build(name: str, seed: int) -> nn.Module:
    """The scenario's distiller, initialised from ``seed`` (ranks use different seeds: the
    trainer must start them all from the main rank's weights)."""
    torch.manual_seed(seed)
    student = cifar_model_dict["resnet20"][0](num_classes=NUM_CLASSES)
    cfg = scenario_cfg(name, "")
    if cfg.DISTILLER.TYPE == "NONE":
        return Vanilla(student)
    teacher = cifar_model_dict["resnet8"][0](num_classes=NUM_CLASSES)
    return distiller_dict[cfg.DISTILLER.TYPE](student, teacher, cfg).train()  # as Trainer.train_pass sets it


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    image = torch.randn(RANKS * PER_RANK, 3, 32, 32, generator=generator)
    return image, torch.randint(0, NUM_CLASSES, (RANKS * PER_RANK,), generator=generator)


def rank_batch(step: int, rank: int) -> tuple[torch.Tensor, ...]:
    image, target = global_batch(step)
    share = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return image[share], target[share], torch.arange(PER_RANK)


def make_trainer(name: str, distiller: nn.Module, prefix: str, device: torch.device = torch.device("cpu")) -> Trainer:
    images, targets = global_batch(0)
    data = DataLoader(TensorDataset(images, targets, torch.arange(len(targets))), batch_size=RANKS * PER_RANK)
    return Trainer(name, distiller, data, data, scenario_cfg(name, prefix), device)


def learnable_grads(distiller: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in distiller.get_learnable_parameters()]


def train_on_this_rank(out_dir: str, names: list[str], device: torch.device) -> None:
    """In a process group of RANKS processes: each scenario trained STEPS steps on this rank's
    share of the batches; its first gradients and final state written to ``<name>_<rank>.pt``."""
    rank = dist.get_rank()
    for name in names:
        distiller = build(name, seed=rank)
        trainer = make_trainer(name, distiller, os.path.join(out_dir, "logs"), device)
        result = {"wrapped_in_ddp": trainer.model is not distiller}
        for step in range(STEPS):
            trainer.train_step(rank_batch(step, rank), epoch=1, iteration=step)
            if step == 0:
                result["grads"] = learnable_grads(distiller)
        result["state"] = distiller.state_dict()
        torch.save(result, os.path.join(out_dir, f"{name}_{rank}.pt"))


def _worker(rank: int, port: int, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        train_on_this_rank(out_dir, names, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def load_rank_results(out_dir: str, names: list[str]) -> dict[str, list[dict]]:
    """{name: [rank 0's result, rank 1's]}, on the CPU."""
    return {name: [torch.load(os.path.join(out_dir, f"{name}_{r}.pt"), map_location="cpu") for r in range(RANKS)]
            for name in names}


def assert_ranks_hold_the_same_weights(name: str, ranks: list[dict]) -> None:
    """Both ranks hold the same weights (and, except for DDP which broadcasts them at the next
    forward, the same BatchNorm statistics)."""
    state_0, state_1 = ranks[0]["state"], ranks[1]["state"]
    learnable = {key for key, value in state_0.items() if value.is_floating_point() and "running" not in key}
    compared = state_0 if name == "lakd_eager" else learnable
    assert [key for key in compared if not torch.equal(state_0[key], state_1[key])] == []


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Every scenario trained for STEPS steps by two gloo ranks: {name: [rank 0's, rank 1's]}."""
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    mp.spawn(_worker, args=(free_port(), out_dir, list(SCENARIOS)), nprocs=RANKS, join=True)
    return load_rank_results(out_dir, list(SCENARIOS))


def single_process_grads(name: str, tmp_path, rank: int) -> list[torch.Tensor]:
    """Gradients of one unsynchronised step on ``rank``'s batch, from the main rank's weights."""
    distiller = build(name, seed=0)
    make_trainer(name, distiller, str(tmp_path)).train_step(rank_batch(0, rank), epoch=1, iteration=0)
    return learnable_grads(distiller)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_average_gradients_once_and_stay_identical(two_rank_results, name, tmp_path):
    ranks = two_rank_results[name]
    # DDP wraps the distiller unless it back-propagates inside its forward.
    assert [r["wrapped_in_ddp"] for r in ranks] == [name != "lakd_eager"] * RANKS
    # Each loss is a mean over a rank's batch, so the gradient of the union batch is the average of
    # the per-rank ones (BatchNorm normalises per rank, as DDP without SyncBatchNorm does).
    per_rank = [single_process_grads(name, tmp_path, rank) for rank in range(RANKS)]
    expected = [(a + b) / 2 for a, b in zip(*per_rank)]
    for result in ranks:
        assert len(result["grads"]) == len(expected)
        for got, want in zip(result["grads"], expected):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert_ranks_hold_the_same_weights(name, ranks)  # after STEPS steps


# --------------------------------------------------------------------------------------------------
# Each rank's share of the data (no process group needed: rank and world size are arguments)


def tensor_loader(num_train: int = 20, batch_size: int = 8) -> TensorCifarLoader:
    images = np.random.default_rng(0).integers(0, 256, (num_train, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(num_train) % NUM_CLASSES
    return TensorCifarLoader(images, labels, batch_size, (0.5,) * 3, (0.25,) * 3, train=True, seed=3)


def test_ranks_split_each_global_batch_of_the_tensor_pipeline():
    loader = tensor_loader(num_train=21)  # batches of 8, 8 and 5
    loader.set_epoch(4)
    expected = list(loader)
    shards = [distributed.GlobalBatchSplit(tensor_loader(num_train=21), RANKS, rank) for rank in range(RANKS)]
    for shard in shards:
        shard.set_epoch(4)
    per_rank = [list(shard) for shard in shards]
    assert [len(batches) for batches in per_rank] == [3, 3]
    for step, batch in enumerate(expected):
        for item, part_0, part_1 in zip(batch, per_rank[0][step], per_rank[1][step]):
            assert torch.equal(torch.cat([part_0, part_1]), item)
    assert [len(b[0]) for b in per_rank[0]] == [4, 4, 3] and [len(b[0]) for b in per_rank[1]] == [4, 4, 2]


def test_a_final_batch_smaller_than_the_ranks_is_skipped_by_all():
    shards = [distributed.GlobalBatchSplit(tensor_loader(num_train=17), RANKS, rank) for rank in range(RANKS)]
    assert [len(list(shard)) for shard in shards] == [2, 2]  # 8, 8 and a batch of 1


def test_sharded_dataloader_partitions_each_epoch_and_reshuffles_by_epoch():
    data = DataLoader(TensorDataset(torch.arange(16)), batch_size=8, num_workers=0)
    shards = [distributed.ShardedLoader(data, RANKS, rank, seed=0) for rank in range(RANKS)]

    def epoch_indices(epoch: int) -> list[list[int]]:
        for shard in shards:
            shard.set_epoch(epoch)
        return [[int(i) for (batch,) in shard for i in batch] for shard in shards]

    first = epoch_indices(1)
    assert all(len(batch) == 4 for (batch,) in shards[0])  # the global batch of 8 over 2 ranks
    assert sorted(first[0] + first[1]) == list(range(16))
    assert epoch_indices(2) != first and epoch_indices(1) == first


def test_global_batch_must_divide_among_the_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ConfigError, match="SOLVER.BATCH_SIZE 8 .* 3 processes"):
        distributed.shard_train_loader(tensor_loader(batch_size=8), seed=0)


# --------------------------------------------------------------------------------------------------
# The trainer sets the epoch of the data order: a resumed run sees the batches it would have seen


class RecordingVanilla(Vanilla):
    """Records the sample indices of every training batch."""

    def __init__(self):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, NUM_CLASSES)))
        self.seen = []

    def forward_train(self, image, target, index, **kwargs):
        self.seen.append(index.tolist())
        logits = self.student(image)
        return logits, {"ce": nn.functional.cross_entropy(logits, target)}

    def forward_test(self, image):
        return self.student(image)


def run_epochs(prefix: str, epochs: int, resume: bool) -> list:
    cfg = load_cfg(None, ["SOLVER.EPOCHS", epochs, "LOG.PREFIX", prefix, "DATASET.PIPELINE", "tensor"])
    distiller = RecordingVanilla()
    val = TensorCifarLoader(np.zeros((8, 3, 32, 32), np.uint8), np.zeros(8, np.int64), 8, (0.5,) * 3, (0.25,) * 3)
    Trainer("run", distiller, tensor_loader(), val, cfg, torch.device("cpu")).train(resume=resume)
    return distiller.seen


def test_resumed_tensor_pipeline_repeats_the_uninterrupted_batches(tmp_path):
    uninterrupted = run_epochs(str(tmp_path / "full"), epochs=2, resume=False)
    run_epochs(str(tmp_path / "split"), epochs=1, resume=False)
    resumed = run_epochs(str(tmp_path / "split"), epochs=2, resume=True)
    assert len(uninterrupted) == 6 and resumed == uninterrupted[3:]
    assert uninterrupted[:3] != uninterrupted[3:]  # epochs are shuffled differently


# --------------------------------------------------------------------------------------------------
# torchrun end to end


def test_torchrun_two_cpu_processes_train_and_only_rank_0_writes(tmp_path):
    root = str(tmp_path / "data")
    write_cifar(root, "cifar100", num_train=64, num_test=32)
    config = tmp_path / "resnet8.yaml"
    config.write_text(
        f'EXPERIMENT:\n  PROJECT: "ddp"\n  NAME: "run"\nDISTILLER:\n  STUDENT: "resnet8"\n'
        f'DATASET:\n  ROOT: "{root}"\n  NUM_WORKERS: 0\n  DOWNLOAD: False\n  TEST:\n    BATCH_SIZE: 16\n'
        f"SOLVER:\n  BATCH_SIZE: 16\n  EPOCHS: 2\n"
    )
    prefix = str(tmp_path / "out")
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "tools/train.py", "--cfg", str(config), "LOG.PREFIX", prefix,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = os.path.join(prefix, "ddp", "run")
    with open(os.path.join(run_dir, "worklog.txt")) as f:
        worklog = f.read()
    assert worklog.count("epoch: ") == 2 and worklog.count("best_acc") == 1  # one writer
    assert len(os.listdir(os.path.join(run_dir, "train.events"))) == 1
    assert load_checkpoint(os.path.join(run_dir, "latest"))["epoch"] == 2
    assert result.stdout.count("CONFIG:") == 1
    assert not os.path.exists(os.path.join(run_dir, "run.lock"))  # the main rank's lock, released
