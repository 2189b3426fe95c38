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

    @torch.no_grad()
    def teacher_outputs(self, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The frozen teacher's ``(logits, feats)`` for ``image``, without autograd.

        Distillers call it before the student's forward and keep only what their loss reads: the
        teacher's transient activations and unused outputs are then freed before the student's
        autograd graph is built, instead of adding to its peak. The teacher is in eval mode and
        draws no random numbers, so this order changes no loss or gradient.
        """
        return self.teacher(image)

    def forward_train(self, **kwargs):
        raise NotImplementedError

    def forward_test(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(image)[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])


class Vanilla(Distiller):
    """The student alone, trained with cross-entropy (``DISTILLER.TYPE: NONE``)."""

    def __init__(self, student: nn.Module):
        super().__init__(student, teacher=None)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        logits_student, _ = self.student(image)
        return logits_student, {"ce": F.cross_entropy(logits_student, target)}
