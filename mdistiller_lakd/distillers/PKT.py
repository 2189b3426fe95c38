"""PKT: Learning Deep Representations with Probabilistic Knowledge Transfer (Passalis & Tefas, 2018)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import in_float32


def similarity_probabilities(features: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-normalised ``(cos + 1) / 2`` between the samples of a batch: each row a distribution over
    the batch. A zero feature has NaN cosines, which become 0 as upstream's."""
    unit = features / (features.pow(2).sum(1, keepdim=True).sqrt() + eps)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(1, keepdim=True)


@in_float32
def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``KL(P_t || P_s)`` of the two batch similarity distributions, averaged over all N x N entries
    (upstream's ``mean``); the teacher's side is a constant target."""
    p_student = similarity_probabilities(f_s, eps)
    p_teacher = similarity_probabilities(f_t.detach(), eps)
    return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


class PKT(Distiller):
    """Probability transfer on the pooled features (``cfg.PKT``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.PKT.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.PKT.LOSS.FEAT_WEIGHT

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        pooled_teacher = self.teacher_outputs(image)[1]["pooled_feat"]
        logits_student, feature_student = self.student(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * pkt_loss(feature_student["pooled_feat"], pooled_teacher),
        }
        return logits_student, losses_dict
