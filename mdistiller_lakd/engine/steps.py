"""The optimizer and the optimisation step of ``SOLVER.TRAINER``, chosen once when a trainer starts.

``base`` and ``crd`` (upstream's trainers; ``crd`` differs only in its loader, which DISTILLER.TYPE
CRD selects) back-propagate the sum of the losses_dict's terms once and step SGD; ``dot`` and
``crd_dot`` back-propagate the task loss apart from the distillation terms (``dot.py``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from yacs.config import CfgNode

from .dot import DOT_TRAINERS, DotStep, check_dot_method, dot_optimizer

SUPPORTED_TRAINERS = ("base", "crd", *DOT_TRAINERS)  # upstream's SOLVER.TRAINER values


def build_optimizer(cfg: CfgNode, distiller: nn.Module) -> torch.optim.Optimizer:
    """SOLVER.TRAINER's optimizer over the distiller's learnable parameters; a ConfigError for a
    method the trainer cannot train."""
    if cfg.SOLVER.TRAINER in DOT_TRAINERS:
        check_dot_method(cfg, distiller)
        return dot_optimizer(cfg, distiller.get_learnable_parameters())
    return torch.optim.SGD(
        distiller.get_learnable_parameters(),
        lr=cfg.SOLVER.LR,
        momentum=cfg.SOLVER.MOMENTUM,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        nesterov=cfg.SOLVER.NESTEROV,
    )


class SummedLossStep:
    """Back-propagate the sum of the terms' means, run ``after_backward``, step (fp16: scaled)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer  # its optimizer, scaler and after_backward, read at each step

    def __call__(self, losses_dict: dict[str, torch.Tensor]) -> None:
        trainer = self.trainer
        loss = sum(term.mean() for term in losses_dict.values())
        trainer.scaler.scale(loss).backward()  # scale: the identity unless fp16
        trainer.after_backward()
        trainer.scaler.step(trainer.optimizer)  # fp16: unscales, and skips the step on inf/NaN gradients
        trainer.scaler.update()


def retains_graph(cfg: CfgNode) -> bool:
    """Whether SOLVER.TRAINER's step back-propagates through one graph twice (DOT's two passes)."""
    return cfg.SOLVER.TRAINER in DOT_TRAINERS


def build_step(cfg: CfgNode, trainer) -> Callable[[dict[str, torch.Tensor]], None]:
    """What ``trainer``'s training step runs on the forward's losses_dict, gradients zeroed: the
    backward pass(es) and the optimizer step, with the trainer's ``model`` (DDP or not),
    ``optimizer``, ``scaler`` and ``after_backward`` as they are at that step."""
    if cfg.SOLVER.TRAINER in DOT_TRAINERS:
        return DotStep(trainer)
    return SummedLossStep(trainer)
