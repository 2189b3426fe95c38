"""FitNet: FitNets: Hints for Thin Deep Nets (Romero et al., 2015)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import ConvReg, count_parameters, get_feat_shapes


class FitNet(Distiller):
    """MSE between the teacher's hint feature and the regressed student feature (``cfg.FITNET``).

    ``HINT_LAYER`` indexes ``feats["feats"]`` of both models; the regressor's shapes come from a
    probe of size ``INPUT_SIZE``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.FITNET.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.FITNET.LOSS.FEAT_WEIGHT
        self.hint_layer = cfg.FITNET.HINT_LAYER
        feat_s_shapes, feat_t_shapes = get_feat_shapes(student, teacher, cfg.FITNET.INPUT_SIZE)
        num_feats = min(len(feat_s_shapes), len(feat_t_shapes))
        if not -num_feats <= self.hint_layer < num_feats:
            raise ValueError(
                f"FITNET.HINT_LAYER {self.hint_layer} is out of range: the student and teacher "
                f"have {len(feat_s_shapes)} and {len(feat_t_shapes)} feature maps"
            )
        self.conv_reg = ConvReg(feat_s_shapes[self.hint_layer], feat_t_shapes[self.hint_layer])

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        return super().get_learnable_parameters() + list(self.conv_reg.parameters())

    def get_extra_parameters(self) -> int:
        return count_parameters(self.conv_reg)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        hint_teacher = self.teacher_outputs(image)[1]["feats"][self.hint_layer]
        logits_student, feature_student = self.student(image)
        hint_student = self.conv_reg(feature_student["feats"][self.hint_layer])
        loss_feat = F.mse_loss(hint_student, hint_teacher)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * loss_feat,
        }
        return logits_student, losses_dict
