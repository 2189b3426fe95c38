"""NST: Like What You Like: Knowledge Distill via Neuron Selectivity Transfer (Huang & Wang, 2017)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import pool_to_common_size


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over samples and channel pairs of ``<a_i, b_j>^2`` (the degree-2 polynomial kernel
    between the spatial activation maps of channels i and j)."""
    return torch.bmm(b, a.transpose(1, 2)).pow(2).mean()


def single_stage_nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Squared MMD with the polynomial kernel between the channels' L2-normalised spatial maps; the
    larger map is first average-pooled to the smaller one's (square) size."""
    f_s, f_t = pool_to_common_size(f_s, f_t.detach())  # the teacher's side is a constant target
    f_s = F.normalize(f_s.flatten(2), dim=2)
    f_t = F.normalize(f_t.flatten(2), dim=2)
    return poly_kernel_mean(f_t, f_t) + poly_kernel_mean(f_s, f_s) - 2 * poly_kernel_mean(f_s, f_t)


def nst_loss(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over the stage pairs ``zip(feats_s, feats_t)``."""
    return sum(single_stage_nst_loss(f_s, f_t) for f_s, f_t in zip(feats_s, feats_t))


class NST(Distiller):
    """Neuron selectivity transfer on every stage output after the stem (``feats[1:]``; ``cfg.NST``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.NST.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.NST.LOSS.FEAT_WEIGHT

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        feats_teacher = self.teacher_outputs(image)[1]["feats"][1:]
        logits_student, feature_student = self.student(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * nst_loss(feature_student["feats"][1:], feats_teacher),
        }
        return logits_student, losses_dict
