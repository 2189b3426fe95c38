"""AT: Paying More Attention to Attention (Zagoruyko & Komodakis, 2017)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import pool_to_common_size


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """The L2-normalised spatial map ``mean_c(f^p)``, flattened to (N, H*W)."""
    return F.normalize(feature.pow(p).mean(1).reshape(feature.size(0), -1))


def single_stage_at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    """Mean squared difference of the two attention maps; the larger map is first average-pooled
    to the smaller one's (square) size."""
    f_s, f_t = pool_to_common_size(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


def at_loss(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """Sum over the stage pairs ``zip(feats_s, feats_t)``."""
    return sum(single_stage_at_loss(f_s, f_t, p) for f_s, f_t in zip(feats_s, feats_t))


class AT(Distiller):
    """Attention transfer on every stage output after the stem (``feats[1:]``; ``cfg.AT``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.p = cfg.AT.P
        self.ce_loss_weight = cfg.AT.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.AT.LOSS.FEAT_WEIGHT

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        feats_teacher = self.teacher_outputs(image)[1]["feats"][1:]
        logits_student, feature_student = self.student(image)
        loss_feat = at_loss(feature_student["feats"][1:], feats_teacher, self.p)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * loss_feat,
        }
        return logits_student, losses_dict
