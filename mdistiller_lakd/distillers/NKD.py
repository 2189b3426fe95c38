"""NKD: normalized knowledge distillation (Yang et al., "From Knowledge Distillation to
Self-Knowledge Distillation", ICCV 2023), as cls_KD's ``NKDLoss``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import check_class_targets, drop_target_column


def nkd_loss(
    logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor, temperature: float, gamma: float
) -> torch.Tensor:
    """Target term at T = 1 (the teacher's target probability times the student's target
    log-probability) plus ``gamma * T^2`` times the cross-entropy between the teacher's and the
    student's distributions over the non-target classes only, renormalised at temperature T. Both
    are batch means; the teacher's side carries no gradient. A cross-entropy, not a KL: its value
    holds the teacher's non-target entropy, as the reference's does."""
    logits_student, logits_teacher = logits_student.float(), logits_teacher.float().detach()
    rows = target.unsqueeze(1)
    log_p_target = F.log_softmax(logits_student, dim=1).gather(1, rows)
    p_teacher_target = F.softmax(logits_teacher, dim=1).gather(1, rows)
    loss_target = -(p_teacher_target * log_p_target).mean()
    log_q_student = F.log_softmax(drop_target_column(logits_student, target) / temperature, dim=1)
    q_teacher = F.softmax(drop_target_column(logits_teacher, target) / temperature, dim=1)
    loss_non_target = -gamma * temperature**2 * (q_teacher * log_q_student).sum(1).mean()
    return loss_target + loss_non_target


class NKD(Distiller):
    """Cross-entropy plus the normalized KD term (``cfg.NKD``); needs a teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        if teacher is None:
            raise ValueError("NKD distils a teacher's logits: it needs a teacher (DISTILLER.TEACHER)")
        super().__init__(student, teacher)
        self.temperature = cfg.NKD.TEMPERATURE
        self.gamma = cfg.NKD.GAMMA
        self.ce_loss_weight = cfg.NKD.LOSS.CE_WEIGHT
        self.nkd_loss_weight = cfg.NKD.LOSS.NKD_WEIGHT

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        check_class_targets("NKD", target)
        logits_teacher = self.teacher_outputs(image)[0]  # first: only its logits stay alive
        logits_student, _ = self.student(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student.float(), target),
            "loss_nkd": self.nkd_loss_weight
            * nkd_loss(logits_student, logits_teacher, target, self.temperature, self.gamma),
        }
        return logits_student, losses_dict
