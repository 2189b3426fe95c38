"""The GPU check (skipped without CUDA; `python tools/benchmark.py --cuda-report` runs it with the
CUDA benchmark): one training step of every distiller on CUDA in fp32, bf16, fp16 and
channels_last; the tensor pipeline on the device; the benchmark's CUDA peak memory; and, with two
or more GPUs, NCCL ranks under torchrun that end with the same weights."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO_ROOT
from mdistiller_lakd.dataset import get_dataset
from mdistiller_lakd.distillers import Vanilla
from test_amp import trainer_for
from test_benchmark import bench_tool  # noqa: F401 (a fixture)
from test_dataset import make_cfg, tensor_cfg
from test_distillers import METHODS, build, model
from test_mdistiller_baselines import SIX
from test_mdistiller_baselines import build as build_feature_baseline
from test_distributed import CUDA_SCENARIOS, RANKS, assert_ranks_hold_the_same_weights, free_port, load_rank_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda", 0)
# SOLVER options of each mode, and the dtype convolutions compute in under it.
MODES = {
    "fp32": ([], torch.float32),
    "bf16": (["SOLVER.AMP", "bf16"], torch.bfloat16),
    "fp16": (["SOLVER.AMP", "fp16"], torch.float16),
    "channels_last": (["SOLVER.CHANNELS_LAST", True], torch.float32),
}
LAKD_OPTS = ["LAKD.LOCATIONS", [1, 2, 3]]  # resnet8's three blocks
FEATURE_BASELINES = dict(SIX)  # ReviewKD, VID, PKT, SP, NST, KDSVD: name -> options
DISTILLERS = ["NONE"] + [m[0] for m in METHODS] + ["LAKD_eager", "LAKD_joint"] + list(FEATURE_BASELINES)


def distiller_of(name: str) -> nn.Module:
    """Every method on small CIFAR-100 models; baselines on test_distillers' pairs."""
    if name == "NONE":
        return Vanilla(model("resnet8", 1))
    if name.startswith("LAKD"):
        return build("LAKD", "resnet8", "resnet8", *LAKD_OPTS, "LAKD.BACKWARD", name.split("_")[1])[0]
    if name in FEATURE_BASELINES:
        return build_feature_baseline(name, *FEATURE_BASELINES[name])
    _, teacher, student, _ = next(m for m in METHODS if m[0] == name)
    return build(name, teacher, student)[0]


@pytest.fixture
def conv_inputs():
    """(device type, output dtype, input in channels_last?) of every training-mode Conv2d call."""
    seen = set()

    def record(module, inputs, output):
        if isinstance(module, nn.Conv2d) and module.training:
            seen.add((output.device.type, output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    handle = nn.modules.module.register_module_forward_hook(record)
    yield seen
    handle.remove()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", DISTILLERS)
def test_one_training_step_of_every_distiller(name, mode, tmp_path, conv_inputs):
    opts, dtype = MODES[mode]
    distiller = distiller_of(name)
    trainer = trainer_for(distiller, tmp_path, *opts, device=DEVICE)
    if mode == "fp16":  # a moderate loss scale: the first step is not skipped for overflow
        trainer.scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
        if getattr(distiller, "local_backward", False):
            distiller.grad_scaler = trainer.scaler  # LAKD eager scales its local losses with it
    teacher_state = copy.deepcopy(distiller.teacher.state_dict()) if distiller.teacher is not None else {}
    learnable = distiller.get_learnable_parameters()
    before = [p.detach().clone() for p in learnable]

    trainer.model.train()
    logits, _, losses = trainer.train_step(next(iter(trainer.train_loader)), epoch=1, iteration=0)

    assert logits.device == DEVICE and all(math.isfinite(value) for value in losses.values())
    assert conv_inputs == {(DEVICE.type, dtype, mode == "channels_last")}
    assert all(p.device == DEVICE and torch.isfinite(p).all() for p in learnable)
    assert sum(not torch.equal(p, b) for p, b in zip(learnable, before)) > len(learnable) // 2
    for key, value in teacher_state.items():
        assert torch.equal(distiller.teacher.state_dict()[key], value), key
    if mode == "fp16":
        assert trainer.scaler.get_scale() == 2.0**10  # finite gradients: the step was taken


def channel_statistics(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))])


def test_tensor_pipeline_keeps_the_data_on_the_device_and_matches_the_cpu(cifar100_root):
    cfg = tensor_cfg(cifar100_root)
    cuda_train, cuda_val, _, _ = get_dataset(cfg, device=DEVICE)
    cpu_train, _, _, _ = get_dataset(cfg, device="cpu")
    _, torchvision_val, _, _ = get_dataset(make_cfg(cifar100_root))
    for loader in (cuda_train, cpu_train):
        loader.set_epoch(1)
    cuda_batches, cpu_batches = list(cuda_train), list(cpu_train)
    assert len(cuda_batches) == len(cpu_batches) > 1
    for cuda_batch, cpu_batch in zip(cuda_batches, cpu_batches):
        assert [item.device for item in cuda_batch] == [DEVICE] * 3
        # The order, crops and flips come from a CPU generator: the same batches on either device.
        torch.testing.assert_close(cuda_batch[0].cpu(), cpu_batch[0])
        assert torch.equal(cuda_batch[1].cpu(), cpu_batch[1]) and torch.equal(cuda_batch[2].cpu(), cpu_batch[2])
    statistics = [channel_statistics(torch.cat([batch[0].cpu() for batch in batches]))
                  for batches in (cuda_batches, cpu_batches)]
    torch.testing.assert_close(*statistics)
    for (image, target), (expected_image, expected_target) in zip(cuda_val, torchvision_val):
        assert image.device == target.device == DEVICE
        torch.testing.assert_close(image.cpu(), expected_image)
        assert torch.equal(target.cpu(), expected_target)


def test_benchmark_reports_the_allocator_peak_and_lakd_eager_against_scratch_and_cat_kd(bench_tool, capsys):
    args = ["--methods", "lakd_eager", "cat_kd", "--device", "cuda", "--batch-size", "32", "--steps", "2", "--json"]
    assert bench_tool.main(args) == 0
    results = {r["method"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert list(results) == ["scratch", "lakd_eager", "cat_kd"]
    assert all(r["peak_source"] == "torch.cuda.max_memory_allocated" and r["peak_mib"] > 0 for r in results.values())
    eager = results["lakd_eager"]
    assert eager["memory_vs_scratch"] == pytest.approx(eager["peak_mib"] / results["scratch"]["peak_mib"])
    assert eager["memory_vs_cat_kd"] == pytest.approx(eager["peak_mib"] / results["cat_kd"]["peak_mib"])


@pytest.mark.skipif(torch.cuda.device_count() < RANKS, reason=f"needs {RANKS} GPUs")
def test_torchrun_nccl_ranks_of_lakd_eager_and_kd_end_with_the_same_weights(tmp_path):
    names = list(CUDA_SCENARIOS)
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", os.path.join(REPO_ROOT, "tests", "nccl_ranks.py"), str(tmp_path), *names,
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = load_rank_results(str(tmp_path), names)
    for name in names:
        # KD runs under DDP; LAKD eager back-propagates inside its forward and averages by itself.
        assert [r["wrapped_in_ddp"] for r in ranks[name]] == [name != "lakd_eager"] * RANKS
        assert_ranks_hold_the_same_weights(name, ranks[name])
