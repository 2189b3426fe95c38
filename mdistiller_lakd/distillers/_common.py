"""Helpers the baseline distillers share: connectors, feature shapes, parameter counts."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn


def count_parameters(*modules: nn.Module) -> int:
    """Number of parameter elements in ``modules`` (a method's connectors or embeddings)."""
    return sum(p.numel() for module in modules for p in module.parameters())


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in training mode, its BatchNorms on batch statistics, its buffers untouched.

    OFD's teacher runs in training mode upstream; its outputs then depend on batch statistics only,
    so switching off running-statistics tracking gives the same outputs while keeping the teacher's
    BatchNorm buffers frozen.
    """
    was_training = model.training
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [m.track_running_stats for m in norms]
    model.train()
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield model
    finally:
        for norm, tracked in zip(norms, tracking):
            norm.track_running_stats = tracked
        model.train(was_training)


def get_feat_shapes(
    student: nn.Module, teacher: nn.Module, input_size: Sequence[int]
) -> tuple[list[torch.Size], list[torch.Size]]:
    """Shapes of ``feats["feats"]`` of both models for one ``3 x H x W`` input.

    Upstream runs this probe in training mode, which moves both models' BatchNorm running
    statistics towards those of the random probe (the teacher's included); here both models run
    in eval mode and keep their state.
    """
    shapes = []
    for model in (student, teacher):
        was_training = model.training
        model.eval()
        parameter = next(model.parameters())
        probe = torch.randn(1, 3, *input_size, device=parameter.device, dtype=parameter.dtype)
        with torch.no_grad():
            shapes.append([f.shape for f in model(probe)[1]["feats"]])
        model.train(was_training)
    return shapes[0], shapes[1]


class ConvReg(nn.Module):
    """FitNet's regressor: maps a student feature map onto the teacher's shape, then BN (+ ReLU).

    A student map twice the teacher's size gets a stride-2 3x3 convolution, half the size a
    stride-2 4x4 transposed convolution, otherwise a valid convolution whose kernel covers the size
    difference (1x1 when the sizes agree).
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        self.use_relu = use_relu
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"ConvReg cannot map a student feature of size {s_h}x{s_w} onto a teacher feature "
                f"of size {t_h}x{t_w}: the student map must be at least as large, or half as large"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x
