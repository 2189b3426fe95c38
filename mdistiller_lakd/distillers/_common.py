"""Helpers the baseline distillers share: connectors, feature shapes, parameter counts."""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        parameter = next(model.parameters())
        image = torch.randn(1, 3, *input_size, device=parameter.device, dtype=parameter.dtype)
        shapes.append([f.shape for f in eval_forward(model, image)[1]["feats"]])
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


def in_float32(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss_fn`` run outside autocast on float32 copies of its tensor arguments: for losses that
    half precision distorts (small differences of nearly equal similarities or probabilities)."""

    @functools.wraps(loss_fn)
    def full_precision(*args, **kwargs):
        args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return loss_fn(*args, **kwargs)

    return full_precision


def pool_to_common_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two maps with the larger one average-pooled to the smaller one's (square) size."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def probe(model: nn.Module, dataset: str) -> tuple[torch.Tensor, dict]:
    """``model(zero image)``: one 1 x 3 x S x S forward (S = 224 on ImageNet, else 32) in eval mode
    without autograd, the previous mode restored. It draws no random numbers and moves no BatchNorm
    statistics, so building a distiller leaves the student as it was."""
    size = 224 if dataset == "imagenet" else 32
    parameter = next(model.parameters())
    return eval_forward(model, torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype))


def eval_forward(model: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``model(image)`` in eval mode without autograd (BatchNorm statistics stay as they are), the
    model's previous mode restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(image)
    finally:
        model.train(was_training)


def check_class_targets(method: str, target: torch.Tensor) -> None:
    """Targets must be (N,) integer class indices: the score labels of mixup/cutmix are not supported."""
    if target.dim() != 1 or target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"{method}: targets must be class indices of shape (N,) with an integer dtype; got shape "
            f"{tuple(target.shape)} of {target.dtype} (score labels such as mixup's are not supported)"
        )


def ignored_teacher(method: str, teacher: nn.Module | None) -> None:
    """What a teacherless method stores as its teacher: None, warning when one was passed (upstream's
    train.py always builds one)."""
    if teacher is not None:
        warnings.warn(f"{method} trains the student without a teacher: the teacher passed is ignored")
    return None


def drop_target_column(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``values`` (N x C) without each row's target column: N x (C - 1), classes in their order.

    A gather of computed columns, not boolean indexing: its shape does not depend on the data, so a
    compiled loss keeps it in its graph."""
    columns = torch.arange(values.shape[1] - 1, device=values.device).expand(values.shape[0], -1)
    return values.gather(1, columns + (columns >= target.unsqueeze(1)).long())
