"""DOT, the Distillation-Oriented Trainer (Zhao et al., ICCV 2023): ``SOLVER.TRAINER dot``.

SGD with two momentum buffers per parameter, one for the gradient of the task loss (``loss_ce``,
momentum ``SOLVER.MOMENTUM - SOLVER.DOT.DELTA``) and one for the gradient of the distillation terms
(the other terms, momentum ``SOLVER.MOMENTUM + SOLVER.DOT.DELTA``). Upstream mdistiller's optimizer
interface and update: the distillation gradient is handed over first with ``step_kd()``, then the
task gradient is in ``.grad`` when ``step()`` updates the weights.

``DotStep`` is the trainer's optimisation step for it: the two backward passes, each gradient set
averaged across ranks under torchrun, fp16 loss scaling. ``check_dot_method`` refuses the methods
whose losses cannot be split that way.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn
from torch.optim.optimizer import Optimizer, required
from yacs.config import CfgNode

from . import distributed
from .cfg import ConfigError

DOT_TRAINERS = ("dot", "crd_dot")  # upstream's names; crd_dot differs from dot only in its loader


class DistillationOrientedTrainer(Optimizer):
    """SGD with separate momentum for the distillation and task gradients (upstream's update).

    Per step: ``step_kd()`` takes the distillation gradients out of ``.grad``; ``step()`` then
    applies the task gradients in ``.grad`` and the distillation gradients. For a parameter with
    both, weight decay joins the task gradient, the task buffer has ``momentum`` and the
    distillation buffer ``momentum_kd``; a parameter with only one of them gets weight decay on that
    one and a buffer with the mean of the two momenta. A buffer starts as its first gradient (the
    distillation one without weight decay), and the weights move by ``-lr`` times each buffer. The
    buffers are ``state[p]["momentum_buffer"]`` and ``state[p]["momentum_kd_buffer"]``, so
    ``state_dict()`` carries both.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = required, momentum: float = 0,
                 momentum_kd: float = 0, dampening: float = 0, weight_decay: float = 0):
        for name, value in (("learning rate", lr), ("momentum", momentum), ("momentum_kd", momentum_kd),
                            ("weight_decay", weight_decay)):
            if value is not required and value < 0.0:
                raise ValueError(f"Invalid {name}: {value}")
        defaults = dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd, dampening=dampening,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("DistillationOrientedTrainer takes one parameter group")
        self.kd_grads: dict[nn.Parameter, torch.Tensor] = {}  # step_kd's gradients, until step()

    @property
    def group(self) -> dict:
        return self.param_groups[0]

    @torch.no_grad()
    def step_kd(self, closure=None):
        """Take the distillation gradients: each parameter's ``.grad`` is kept for ``step()`` and
        cleared, so the task loss's backward starts from none. Replaces any earlier ones not
        stepped (a step skipped for non-finite fp16 gradients)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.kd_grads = {}
        for p in self.group["params"]:
            if p.grad is not None:
                self.kd_grads[p] = p.grad
                p.grad = None
        return loss

    @torch.no_grad()
    def step(self, closure=None):
        """Update the weights with the task gradients in ``.grad`` and those of ``step_kd()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group, kd_grads = self.group, self.kd_grads
        lr, decay, damp = group["lr"], group["weight_decay"], group["dampening"]
        momentum, momentum_kd = group["momentum"], group["momentum_kd"]
        mean_momentum = (momentum + momentum_kd) / 2.0
        task_params = [p for p in group["params"] if p.grad is not None]
        for p in task_params:
            grad = p.grad.add(p, alpha=decay) if decay != 0 else p.grad
            if momentum != 0:
                grad = self._momentum(p, "momentum_buffer", grad,
                                      momentum if p in kd_grads else mean_momentum, damp)
            p.add_(grad, alpha=-lr)
        task_set = set(task_params)
        for p, grad in kd_grads.items():
            # A weight with a task gradient had its decay applied with it; one without gets it here,
            # except on the buffer's first step (upstream's order).
            if p not in task_set and decay != 0 and "momentum_kd_buffer" in self.state[p]:
                grad = grad.add(p, alpha=decay)
            buffer = self._momentum(p, "momentum_kd_buffer", grad,
                                    momentum_kd if p in task_set else mean_momentum, damp)
            p.add_(buffer, alpha=-lr)
        self.kd_grads = {}
        return loss

    def _momentum(self, p: nn.Parameter, key: str, grad: torch.Tensor, momentum: float,
                  dampening: float) -> torch.Tensor:
        """``state[p][key]`` moved by ``grad`` (a copy of ``grad`` on its first step)."""
        state = self.state[p]
        if key not in state:
            state[key] = grad.detach().clone()
        else:
            state[key].mul_(momentum).add_(grad, alpha=1 - dampening)
        return state[key]


def dot_optimizer(cfg: CfgNode, params: Iterable[nn.Parameter]) -> DistillationOrientedTrainer:
    """Upstream's DOT optimizer of a config: momenta ``MOMENTUM -/+ DOT.DELTA`` (task/distillation)."""
    if cfg.SOLVER.NESTEROV:
        raise ConfigError(f"SOLVER.NESTEROV: SOLVER.TRAINER {cfg.SOLVER.TRAINER} has no Nesterov momentum; set it to False")
    if not 0 <= cfg.SOLVER.DOT.DELTA <= cfg.SOLVER.MOMENTUM:
        raise ConfigError(f"SOLVER.DOT.DELTA {cfg.SOLVER.DOT.DELTA} must lie in 0..SOLVER.MOMENTUM ({cfg.SOLVER.MOMENTUM}): "
                          "the task momentum is MOMENTUM - DELTA")
    return DistillationOrientedTrainer(
        params,
        lr=cfg.SOLVER.LR,
        momentum=cfg.SOLVER.MOMENTUM - cfg.SOLVER.DOT.DELTA,
        momentum_kd=cfg.SOLVER.MOMENTUM + cfg.SOLVER.DOT.DELTA,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )


def check_dot_method(cfg: CfgNode, distiller: nn.Module) -> None:
    """ConfigError unless the distiller's task loss can be back-propagated apart from its
    distillation terms."""
    why = None
    if not getattr(distiller, "requires_teacher", True):
        why = "it has no teacher, so no distillation gradient to give its own momentum"
    elif getattr(distiller, "local_backward", False):
        why = "its forward back-propagates some losses itself, mixing their gradients with the task loss's"
    elif getattr(distiller, "task_loss_key", None) is None:
        why = "its losses have no separate task (cross-entropy) term"
    if why:
        raise ConfigError(
            f"SOLVER.TRAINER {cfg.SOLVER.TRAINER}: DISTILLER.TYPE {cfg.DISTILLER.TYPE} cannot train with DOT: "
            f"{why}. Use SOLVER.TRAINER base"
        )


class _DistillationPass:
    """What GradScaler steps for the distillation gradients: the DOT optimizer's parameters, with
    ``step`` handing the gradients to ``step_kd``. The scaler unscales and checks them apart from
    the task's, and skips ``step_kd`` when they are not finite."""

    def __init__(self, optimizer: DistillationOrientedTrainer):
        self.optimizer = optimizer
        self.stepped = False

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def step(self) -> None:
        self.optimizer.step_kd()
        self.stepped = True


class DotStep:
    """One DOT optimisation step of ``trainer`` from a losses_dict: back-propagate the distillation
    terms (all but the distiller's ``task_loss_key``), ``step_kd``, then the task loss, ``step``.

    Under DDP both backward passes run without its reducer (one forward, two backwards) and each
    gradient set is averaged across ranks before it is used; all ranks build the same graph, so
    the parameters with a gradient are the same on each. With fp16 both passes are scaled; a
    non-finite distillation gradient skips the task pass and the step, as GradScaler skips a step.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer  # its model, optimizer and scaler, read at each step
        self.task_loss_key = trainer.distiller.task_loss_key

    def _backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        no_sync = getattr(self.trainer.model, "no_sync", contextlib.nullcontext)
        with no_sync():
            self.trainer.scaler.scale(loss).backward(retain_graph=retain_graph)
        distributed.average_gradients([p for p in self.trainer.optimizer.group["params"] if p.grad is not None])

    def __call__(self, losses_dict: dict[str, torch.Tensor]) -> None:
        if self.task_loss_key not in losses_dict:
            raise KeyError(f"SOLVER.TRAINER dot: the losses_dict has no task loss '{self.task_loss_key}' "
                           f"(it has {', '.join(losses_dict)})")
        optimizer, scaler = self.trainer.optimizer, self.trainer.scaler
        task_loss = losses_dict[self.task_loss_key].mean()
        distillation_loss = sum(term.mean() for key, term in losses_dict.items() if key != self.task_loss_key)
        self._backward(distillation_loss, retain_graph=True)
        distillation_pass = _DistillationPass(optimizer)
        scaler.step(distillation_pass)
        if distillation_pass.stepped:
            self._backward(task_loss, retain_graph=False)
            scaler.step(optimizer)
        else:
            optimizer.zero_grad(set_to_none=True)
        scaler.update()
