"""The distiller interface shared by every method (upstream mdistiller's, unchanged)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ImageGrid(NamedTuple):
    """Images a distiller shows once per epoch: the trainer writes ``<run>/<folder>/epoch_<N>.png``
    and the tensorboard image ``tag``."""

    folder: str
    tag: str
    rows: torch.Tensor  # [rows, n, C, H, W], in the normalised input space of the training images


class CompileTarget(NamedTuple):
    """A function ``SOLVER.COMPILE`` compiles: ``owner.<attribute>``, replaced on ``owner`` by its
    compiled self (nothing is wrapped: state_dict keys and hooks on ``owner`` stay as they are)."""

    name: str  # what the worklog calls it
    owner: object
    attribute: str = "forward"


class Distiller(nn.Module):
    """A student trained against a frozen teacher.

    ``forward(image=, target=, epoch=, ...)`` returns ``(logits, losses_dict)`` in training mode and
    the student's logits in eval mode; the trainer sums ``losses_dict`` and back-propagates it.

    ``build_distiller`` loads a teacher only when ``requires_teacher`` is True and passes the
    keyword arguments of ``build_kwargs``; the Trainer calls ``on_train_start`` once per fresh run.
    Other optional trainer hooks, no-ops here: ``get_self_optimized_parameters`` (parameters the method
    steps with its own optimizer), ``epoch_metrics`` (per-epoch scalars) and ``epoch_images`` (a
    per-epoch image grid of ``num_epoch_images`` fixed validation images) and ``compile_plan``
    (what ``SOLVER.COMPILE`` may compile).
    """

    # Whether the method distils a trained teacher: ``build_distiller`` loads one only when True
    # and otherwise passes ``teacher=None`` (self-distillation, the student alone).
    requires_teacher: bool = True
    num_epoch_images = 0  # validation images `epoch_images` is given each epoch (0: not called)
    # Names (in the distiller's state_dict) of buffers the method itself keeps equal on every rank
    # under torchrun: DDP must not re-broadcast them from rank 0 at each forward, nor
    # ``Trainer.evaluate`` before validating.
    rank_synced_buffers: tuple[str, ...] = ()
    # The losses_dict key of the task loss (cross-entropy on the labels) that SOLVER.TRAINER dot
    # back-propagates apart from the other terms; None when the method has no such term.
    task_loss_key: str | None = "loss_ce"

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

    @classmethod
    def build_kwargs(cls, cfg, student: nn.Module, num_classes: int, num_data: int) -> dict:
        """Extra keyword arguments of the constructor that come from the dataset (CRD's ``num_data``)
        or from files; may prepare ``student`` (weights a method fine-tunes). ValueError when the
        config cannot be used."""
        return {}

    def on_train_start(self, train_loader) -> dict[str, float]:
        """Called once at the start of a fresh run (not on --resume), the model on its device; the
        returned metrics are logged (worklog, tensorboard)."""
        return {}

    def get_self_optimized_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the trainer's optimizer that the method updates itself (and, under
        torchrun, averages across ranks itself): trainable, but never in DDP's reducer."""
        return []

    def epoch_metrics(self) -> dict[str, float]:
        """Scalars of the epoch just trained, logged to the worklog and tensorboard; called once per
        epoch on every rank (the trainer averages them across ranks), which resets them."""
        return {}

    def epoch_images(self, images: torch.Tensor) -> list[ImageGrid]:
        """Grids to show for the epoch just trained, given ``num_epoch_images`` fixed validation
        images (fewer if the validation set is smaller); called on the main rank only, with the
        global RNG state restored afterwards."""
        return []

    def compile_plan(self) -> tuple[list[CompileTarget], str]:
        """What ``SOLVER.COMPILE`` compiles, and what then still runs eagerly and why ("" if nothing).

        By default the whole training forward, teacher, student and loss in one graph: right for a
        method whose forward is a function of its inputs and weights. A method that draws random
        numbers, keeps state outside its modules or back-propagates inside its forward narrows it
        (``models_only_plan``)."""
        models = "teacher, student" if self.teacher is not None else "student"
        return [CompileTarget(f"training forward ({models}, loss)", self, "forward_train")], ""

    def models_only_plan(self, reason: str) -> tuple[list[CompileTarget], str]:
        """The plan of a method whose loss must run eagerly (``reason``): the teacher's and the
        student's forwards compiled, each alone."""
        models = [("teacher", self.teacher), ("student", self.student)]
        return [CompileTarget(name, model) for name, model in models if model is not None], f"the loss ({reason})"

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
    """The student alone, trained with cross-entropy (``DISTILLER.TYPE: NONE``).

    ``teacher`` and ``cfg`` are accepted, and ignored, so that every method builds alike."""

    requires_teacher = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, cfg=None):
        super().__init__(student, teacher=None)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        logits_student, _ = self.student(image)
        return logits_student, {"ce": F.cross_entropy(logits_student, target)}
