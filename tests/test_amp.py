"""Mixed precision and memory format: bf16 autocast through tools/train.py (vanilla and LAKD, training
and validation), fp16 with one GradScaler that LAKD's local backward shares, SOLVER.AMP errors, and
channels_last models and inputs."""
import math
import os
import re
import runpy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.distillers import LAKD, Vanilla
from mdistiller_lakd.engine import utils
from mdistiller_lakd.engine.cfg import ConfigError, load_cfg
from mdistiller_lakd.engine.trainer import Trainer
from mdistiller_lakd.models import cifar_model_dict

NUM_CLASSES = 10


def model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    return cifar_model_dict[name][0](num_classes=num_classes)


@pytest.fixture
def conv_output_dtypes():
    """(training?, dtype) of every Conv2d output while the test runs."""
    seen = set()

    def record(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            seen.add((module.training, output.dtype))

    handle = nn.modules.module.register_module_forward_hook(record)
    yield seen
    handle.remove()


@pytest.mark.parametrize("method", ["NONE", "LAKD"])
def test_bf16_trains_and_validates_under_autocast_through_tools_train(tmp_path, method, conv_output_dtypes):
    root = str(tmp_path / "data")
    write_cifar(root, "cifar100", num_train=16, num_test=8)
    teacher_ckpt = str(tmp_path / "resnet8.pth")
    torch.save({"model": model("resnet8", 100).state_dict()}, teacher_ckpt)
    config = tmp_path / "run.yaml"
    config.write_text(
        f'EXPERIMENT:\n  PROJECT: "amp"\n  NAME: "{method}"\n'
        f'DISTILLER:\n  TYPE: "{method}"\n  TEACHER: "resnet8"\n  STUDENT: "resnet8"\n  TEACHER_CKPT: "{teacher_ckpt}"\n'
        f'DATASET:\n  ROOT: "{root}"\n  NUM_WORKERS: 0\n  DOWNLOAD: False\n  TEST:\n    BATCH_SIZE: 8\n'
        'SOLVER:\n  BATCH_SIZE: 8\n  EPOCHS: 1\n  AMP: "bf16"\nLAKD:\n  LOCATIONS: [1, 3]\n'
    )
    train = runpy.run_path(os.path.join(REPO_ROOT, "tools", "train.py"))["main"]
    assert train(["--cfg", str(config), "LOG.PREFIX", str(tmp_path / "out")]) == 0
    assert {(True, torch.bfloat16), (False, torch.bfloat16)} <= conv_output_dtypes
    worklog = (tmp_path / "out" / "amp" / method / "worklog.txt").read_text()
    assert math.isfinite(float(re.search(r"train_loss: (\S+)", worklog).group(1)))


class CountingScaler(torch.amp.GradScaler):
    """A real GradScaler that counts its calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"scale": 0, "step": 0, "update": 0}

    def scale(self, outputs):
        self.calls["scale"] += 1
        return super().scale(outputs)

    def step(self, optimizer, *args, **kwargs):
        self.calls["step"] += 1
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None):
        self.calls["update"] += 1
        return super().update(new_scale)


def distiller_of(method: str) -> nn.Module:
    torch.manual_seed(0)
    if method == "NONE":
        return Vanilla(model("resnet8"))
    cfg = load_cfg(None, ["DISTILLER.TYPE", "LAKD", "DISTILLER.STUDENT", "resnet8", "LAKD.LOCATIONS", [1, 2, 3]])
    return LAKD(model("resnet8"), model("resnet8"), cfg)


def trainer_for(distiller: nn.Module, tmp_path, *opts, device: torch.device = torch.device("cpu")) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    images, targets = torch.randn(4, 3, 32, 32, generator=generator), torch.arange(4) % NUM_CLASSES
    train = DataLoader(TensorDataset(images, targets, torch.arange(4)), batch_size=4)
    val = DataLoader(TensorDataset(images, targets), batch_size=4)
    cfg = load_cfg(None, ["LOG.PREFIX", str(tmp_path), *opts])
    return Trainer("amp", distiller, train, val, cfg, device)


def one_step_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.model.train()
    trainer.train_step(next(iter(trainer.train_loader)), epoch=1, iteration=0)
    return {name: p.grad.clone() for name, p in trainer.distiller.student.named_parameters()}


@pytest.mark.parametrize("method, local_losses", [("NONE", 0), ("LAKD", 2)])
def test_fp16_scales_every_backward_with_one_scaler_and_unscales_once(tmp_path, method, local_losses):
    distiller = distiller_of(method)
    reference = one_step_grads(trainer_for(distiller_of(method), tmp_path / "fp32"))  # same seed
    trainer = trainer_for(distiller, tmp_path / "fp16", "SOLVER.AMP", "fp16")
    if method == "LAKD":
        assert distiller.local_backward and distiller.grad_scaler is trainer.scaler
    trainer.scaler = CountingScaler("cpu", init_scale=2.0**10)
    if method == "LAKD":
        distiller.grad_scaler = trainer.scaler
    grads = one_step_grads(trainer)
    # The final loss and each of LAKD's eager local losses are scaled; one unscale-and-step.
    assert trainer.scaler.calls == {"scale": 1 + local_losses, "step": 1, "update": 1}
    assert trainer.scaler.get_scale() == 2.0**10  # finite gradients: the step was taken
    # Unscaled gradients match full precision ones to fp16's accuracy, the stem's (trained by the
    # first local loss under LAKD) included: a loss scaled by another factor would be off by 2**10.
    for name, grad in grads.items():
        ratio = grad.norm() / reference[name].norm()
        assert 0.9 < ratio < 1.1, (name, float(ratio))


def test_amp_mode_errors_name_the_key(monkeypatch):
    with pytest.raises(ConfigError, match='SOLVER.AMP: unknown mode \'fp8\'; use "" .off., "bf16" or "fp16"'):
        utils.amp_dtype("fp8", torch.device("cpu"))
    assert utils.amp_dtype("", torch.device("cpu")) is None

    class UnsupportedAutocast(torch.autocast):
        def __init__(self, device_type, dtype=None, enabled=True):
            import warnings

            warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.")
            super().__init__(device_type, dtype=dtype, enabled=False)

    monkeypatch.setattr(torch, "autocast", UnsupportedAutocast)
    with pytest.raises(ConfigError, match=r'SOLVER.AMP: "fp16" is not supported on cpu .*target dtype'):
        utils.amp_dtype("fp16", torch.device("cpu"))


def test_channels_last_models_and_inputs_in_training_and_validation(tmp_path):
    student = model("resnet8")
    layouts = []
    student.conv1.register_forward_pre_hook(
        lambda module, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    trainer = trainer_for(Vanilla(student), tmp_path, "SOLVER.CHANNELS_LAST", True)
    assert student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    one_step_grads(trainer)
    trainer.evaluate()
    assert layouts == [True, True]
