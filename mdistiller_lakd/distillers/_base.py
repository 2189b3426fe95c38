"""The distiller interface shared by every method (upstream mdistiller's, unchanged)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Distiller(nn.Module):
    """A student trained against a frozen teacher.

    ``forward(image=, target=, epoch=, ...)`` returns ``(logits, losses_dict)`` in training mode and
    the student's logits in eval mode; the trainer sums ``losses_dict`` and back-propagates it.
    """

    # Whether the method distils a trained teacher: ``build_distiller`` loads one only when True
    # and otherwise passes ``teacher=None`` (self-distillation, the student alone).
    requires_teacher: bool = True
    # Names (in the distiller's state_dict) of buffers the method itself keeps equal on every rank
    # under torchrun: DDP must not re-broadcast them from rank 0 at each forward, nor
    # ``Trainer.evaluate`` before validating.
    rank_synced_buffers: tuple[str, ...] = ()

    def __init__(self, student: nn.Module, teacher: nn.Module | None):
        super().__init__()
        self.student = student
        self.teacher = teacher

    def train(self, mode: bool = True) -> "Distiller":
        # The teacher stays in eval mode: its BatchNorm statistics are frozen.
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates; methods with connectors or embeddings add theirs."""
        return list(self.student.parameters())

    def get_extra_parameters(self) -> int:
        """Number of parameters the method adds beyond the student (connectors, embeddings)."""
        return 0

    def forward_train(self, **kwargs):
        raise NotImplementedError

    def forward_test(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(image)[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])


class Vanilla(Distiller):
    """The student alone, trained with cross-entropy (``DISTILLER.TYPE: NONE``).

    ``teacher`` and ``cfg`` are accepted, and ignored, so that every method builds alike."""

    requires_teacher = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, cfg=None):
        super().__init__(student, teacher=None)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        logits_student, _ = self.student(image)
        return logits_student, {"ce": F.cross_entropy(logits_student, target)}
