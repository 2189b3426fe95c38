"""The Separation-Decoupling Mechanism (SDM) on an unmodified student, with forward hooks
(docs/METHOD.md, "Separation-Decoupling Mechanism").

The student is cut after the blocks at ``LOCATIONS`` into local modules. A forward hook on each
cut block computes the local loss ``L_k = weight * mse(phi_k(f_k), t_s(k))`` against the teacher
feature supplied for this step and hands the next module ``f_k.detach()`` (``DETACH``). With eager
backward, ``L_k`` is back-propagated inside the hook, so module k's autograd graph is freed before
module k+1 runs. No model class is edited or wrapped: the student's ``state_dict`` is unchanged
and the connectors ``phi_k`` live here.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import block_feature, replace_feature

Shape = Sequence[int]  # (C, H, W)


def resize(feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling down to ``size``, bilinear interpolation up to it."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=tuple(size), mode="bilinear", align_corners=False)


class Connector(nn.Module):
    """phi_k: the identity when the student's and teacher's (C, H, W) agree; otherwise a resize to
    the teacher's spatial size, then a 1x1 convolution and BatchNorm to the teacher's channels."""

    def __init__(self, student_shape: Shape, teacher_shape: Shape):
        super().__init__()
        self.project = None
        if tuple(student_shape) != tuple(teacher_shape):
            self.project = nn.Sequential(
                nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False),
                nn.BatchNorm2d(teacher_shape[0]),
            )

    def forward(self, feature: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.project is None:
            return feature
        return self.project(resize(feature, size))


def resolution_matched(feature_size: Sequence[int], teacher_sizes: list[Sequence[int]]) -> int | None:
    """Index of the deepest teacher stage whose (H, W) equals ``feature_size``; None if none does."""
    matches = [i for i, size in enumerate(teacher_sizes) if tuple(size) == tuple(feature_size)]
    return matches[-1] if matches else None


class LocalModules(nn.Module):
    """SDM hooks on the blocks at LOCATIONS and their connectors.

    ``blocks[i]``, ``connectors[i]`` and ``weights[i]`` belong to location i + 1; the first
    ``num_cuts`` locations are cuts (k < K), a further one is the last block when FINAL_FEAT_WEIGHT
    > 0 (its loss joins the final objective: no detach, no eager backward). The hooks act only
    inside ``collecting``: elsewhere (evaluation, any plain call of the student) the student runs
    as it is.
    """

    def __init__(
        self,
        blocks: list[nn.Module],
        connectors: list[Connector],
        weights: list[float],
        num_cuts: int,
        detach: bool,
        eager: bool,
    ):
        super().__init__()
        self.connectors = nn.ModuleList(connectors)
        self.weights = weights
        self.detach = detach
        self.eager = eager
        self.grad_scaler = None  # a torch.amp.GradScaler under fp16 AMP: eager losses need its scale
        self._targets: list[torch.Tensor | None] | None = None
        self._losses: dict[str, torch.Tensor] = {}
        self.handles = [
            block.register_forward_hook(self._hook(index, is_cut=index < num_cuts))
            for index, block in enumerate(blocks)
        ]

    @contextlib.contextmanager
    def collecting(self, targets: list[torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Within it, the student's forward fills the yielded dict with ``loss_local_<k>`` (1-based),
        each against ``targets[k - 1]``, the teacher feature t_s(k). ``targets`` is consumed: each
        entry is set to None once used, so the teacher's features are freed as the student goes."""
        self._targets, self._losses = targets, {}
        try:
            yield self._losses
            if len(self._losses) != len(self.handles):
                raise RuntimeError(
                    "LAKD: some of the student's cut blocks did not run in its forward; its forward "
                    "does not call the blocks that find_blocks lists"
                )
        finally:
            self._targets, self._losses = None, {}

    def _hook(self, index: int, is_cut: bool):
        def local_loss(block: nn.Module, inputs: tuple, output):
            if self._targets is None:
                return None
            feature = block_feature(block, output)
            target, self._targets[index] = self._targets[index], None  # freed once used
            aligned = self.connectors[index](feature, target.shape[-2:])
            loss = self.weights[index] * F.mse_loss(aligned, target)
            if is_cut and self.eager and loss.requires_grad:
                self._backward(loss)
                loss = loss.detach()  # applied already; returned for logging
            self._losses[f"loss_local_{index + 1}"] = loss
            if not (is_cut and self.detach):
                return None
            return replace_feature(output, feature.detach(), detach_rest=True)

        return local_loss

    def _backward(self, loss: torch.Tensor) -> None:
        # The forward may run under autocast; backward passes are not to.
        with torch.autocast(device_type=loss.device.type, enabled=False):
            (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()


def probe_shapes(
    student: nn.Module, blocks: list[nn.Module], teacher: nn.Module, input_size: int
) -> tuple[list[torch.Size], list[torch.Size]]:
    """(C, H, W) of every block's cut feature and of every teacher ``feats["feats"]`` entry, from
    one no-grad forward of each model on a ``3 x input_size x input_size`` input.

    The models run in eval mode, so BatchNorm running statistics stay as they were; their
    train/eval modes are restored afterwards.
    """
    block_shapes: dict[int, torch.Size] = {}

    def record(index: int):
        def hook(block: nn.Module, inputs: tuple, output) -> None:
            block_shapes[index] = block_feature(block, output).shape[1:]

        return hook

    handles = [block.register_forward_hook(record(i)) for i, block in enumerate(blocks)]
    modes = [(module, module.training) for model in (student, teacher) for module in model.modules()]
    parameter = next(student.parameters())
    probe = torch.zeros(1, 3, input_size, input_size, device=parameter.device, dtype=parameter.dtype)
    try:
        student.eval()
        teacher.eval()
        with torch.no_grad():
            student(probe)
            teacher_feats = teacher(probe)[1]["feats"]
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    if len(block_shapes) != len(blocks):
        raise ValueError(
            f"LAKD: {len(blocks) - len(block_shapes)} of the blocks of {type(student).__name__} did not "
            "run in its forward; its forward does not call the blocks that find_blocks lists"
        )
    return [block_shapes[i] for i in range(len(blocks))], [f.shape[1:] for f in teacher_feats]
