"""RKD: Relational Knowledge Distillation (Park et al., CVPR 2019)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller


def pairwise_distances(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """Euclidean distances between the rows of ``e`` (squared if asked), clamped below at
    ``eps`` before the square root, with an exact zero diagonal."""
    e_square = e.pow(2).sum(dim=1)
    distances = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        distances = distances.sqrt()
    off_diagonal = 1 - torch.eye(len(e), dtype=distances.dtype, device=distances.device)
    return distances * off_diagonal


def normalized_distances(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """Pairwise distances divided by the mean of the positive ones."""
    distances = pairwise_distances(e, squared, eps)
    return distances / distances[distances > 0].mean()


def angles(e: torch.Tensor) -> torch.Tensor:
    """Cosines of the angles ``(e_i - e_j, e_k - e_j)`` over all triplets, flattened."""
    differences = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).view(-1)


def rkd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    squared: bool = False,
    eps: float = 1e-12,
    distance_weight: float = 25,
    angle_weight: float = 50,
) -> torch.Tensor:
    """Weighted smooth-L1 distances between the student's and teacher's distance and angle
    structures over the batch."""
    student = f_s.view(f_s.shape[0], -1)
    teacher = f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        teacher_distances = normalized_distances(teacher, squared, eps)
        teacher_angles = angles(teacher)
    loss_distance = F.smooth_l1_loss(normalized_distances(student, squared, eps), teacher_distances)
    loss_angle = F.smooth_l1_loss(angles(student), teacher_angles)
    return distance_weight * loss_distance + angle_weight * loss_angle


class RKD(Distiller):
    """Relational distillation on the pooled features (``cfg.RKD``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.distance_weight = cfg.RKD.DISTANCE_WEIGHT
        self.angle_weight = cfg.RKD.ANGLE_WEIGHT
        self.ce_loss_weight = cfg.RKD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.RKD.LOSS.FEAT_WEIGHT
        self.eps = cfg.RKD.PDIST.EPSILON
        self.squared = cfg.RKD.PDIST.SQUARED

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        pooled_teacher = self.teacher_outputs(image)[1]["pooled_feat"]
        logits_student, feature_student = self.student(image)
        loss_rkd = rkd_loss(
            feature_student["pooled_feat"],
            pooled_teacher,
            self.squared,
            self.eps,
            self.distance_weight,
            self.angle_weight,
        )
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * loss_rkd,
        }
        return logits_student, losses_dict
