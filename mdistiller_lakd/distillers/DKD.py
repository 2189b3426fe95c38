"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller


def _target_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Boolean (N, C) mask, True at each sample's ground-truth class."""
    return torch.zeros_like(logits).scatter_(1, target.reshape(-1, 1), 1).bool()


def _binary(probabilities: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """(N, 2): the probability of the target class and the total of the others."""
    return torch.stack(
        [(probabilities * gt_mask).sum(1), (probabilities * ~gt_mask).sum(1)], dim=1
    )


def dkd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """``alpha * TCKD + beta * NCKD``, each a summed KL scaled by ``T^2`` and divided by N.

    TCKD compares the binary (target, non-target) distributions; NCKD compares the distributions
    over the non-target classes, obtained by pushing the target logit down by 1000 before the
    softmax, as upstream does.
    """
    gt_mask = _target_mask(logits_student, target)
    scale = temperature**2 / target.shape[0]
    p_student = _binary(F.softmax(logits_student / temperature, dim=1), gt_mask)
    p_teacher = _binary(F.softmax(logits_teacher / temperature, dim=1), gt_mask)
    tckd = F.kl_div(torch.log(p_student), p_teacher, reduction="sum") * scale
    suppress_target = 1000.0 * gt_mask
    nckd = F.kl_div(
        F.log_softmax(logits_student / temperature - suppress_target, dim=1),
        F.softmax(logits_teacher / temperature - suppress_target, dim=1),
        reduction="sum",
    ) * scale
    return alpha * tckd + beta * nckd


class DKD(Distiller):
    """Cross-entropy plus DKD, whose weight ramps linearly over ``DKD.WARMUP`` epochs."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.DKD.CE_WEIGHT
        self.alpha = cfg.DKD.ALPHA
        self.beta = cfg.DKD.BETA
        self.temperature = cfg.DKD.T
        self.warmup = cfg.DKD.WARMUP

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, epoch: int, **kwargs):
        logits_teacher = self.teacher_outputs(image)[0]
        logits_student, _ = self.student(image)
        loss_dkd = dkd_loss(
            logits_student, logits_teacher, target, self.alpha, self.beta, self.temperature
        )
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": min(epoch / self.warmup, 1.0) * loss_dkd,
        }
        return logits_student, losses_dict
