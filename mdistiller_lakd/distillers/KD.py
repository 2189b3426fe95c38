"""KD: Distilling the Knowledge in a Neural Network (Hinton et al., 2015)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller


def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` on temperature-softened distributions, summed over classes and
    averaged over the batch (upstream's reduction, not ``batchmean`` over all elements)."""
    log_p_student = F.log_softmax(logits_student / temperature, dim=1)
    p_teacher = F.softmax(logits_teacher / temperature, dim=1)
    kl = F.kl_div(log_p_student, p_teacher, reduction="none").sum(1).mean()
    return kl * temperature**2


class KD(Distiller):
    """Cross-entropy plus the softened-logit KL term (``cfg.KD``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.temperature = cfg.KD.TEMPERATURE
        self.ce_loss_weight = cfg.KD.LOSS.CE_WEIGHT
        self.kd_loss_weight = cfg.KD.LOSS.KD_WEIGHT

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        logits_teacher = self.teacher_outputs(image)[0]
        logits_student, _ = self.student(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.kd_loss_weight * kd_loss(logits_student, logits_teacher, self.temperature),
        }
        return logits_student, losses_dict
