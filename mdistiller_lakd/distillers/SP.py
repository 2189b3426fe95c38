"""SP: Similarity-Preserving Knowledge Distillation (Tung & Mori, ICCV 2019)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import in_float32


def batch_similarity(feature: torch.Tensor) -> torch.Tensor:
    """The N x N Gram matrix of the flattened samples, each row L2-normalised."""
    flat = feature.reshape(feature.shape[0], -1)
    return F.normalize(flat @ flat.t())


@in_float32
def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance of the two batch similarities over N^2; the teacher's is a
    constant target. A scalar (upstream's is the same number in a one-element tensor)."""
    difference = batch_similarity(f_t.detach()) - batch_similarity(f_s)
    return difference.pow(2).sum() / f_s.shape[0] ** 2


class SP(Distiller):
    """Similarity preservation on the last stage's feature map (``feats[-1]``; ``cfg.SP``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.SP.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.SP.LOSS.FEAT_WEIGHT

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        last_teacher = self.teacher_outputs(image)[1]["feats"][-1]
        logits_student, feature_student = self.student(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * sp_loss(feature_student["feats"][-1], last_teacher),
        }
        return logits_student, losses_dict
