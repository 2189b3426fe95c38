"""USKD: universal self-knowledge distillation, teacherless (Yang et al., "From Knowledge
Distillation to Self-Knowledge Distillation", ICCV 2023), as cls_KD's ``USKDLoss``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import check_class_targets, count_parameters, drop_target_column, ignored_teacher, probe

EPS = 1e-6  # the reference's guard in the ranking's denominators


def mid_feature_index(feats: dict, feat_index: int | None) -> int:
    """Index into ``feats["feats"]`` of the map the weak head reads: ``feat_index`` when given, else
    the stage before the one the pooled feature comes from (-2), or the last stage (-1) when a 1x1
    head convolution sits between it and the pooled feature (MobileNetV2, ShuffleV2), which is the
    reference's second-to-last backbone output on every family."""
    maps = feats["feats"]
    if feat_index is None:
        pooled_from_last = feats["pooled_feat"].shape[1] == maps[-1].shape[1]
        if pooled_from_last and len(maps) < 2:
            raise ValueError(f"USKD.FEAT_INDEX: the model has {len(maps)} feature map(s), the rule needs feats[-2]")
        feat_index = -2 if pooled_from_last else -1
    if not -len(maps) <= feat_index < len(maps):
        raise ValueError(f"USKD.FEAT_INDEX {feat_index} is outside the model's {len(maps)} feature maps")
    if maps[feat_index].dim() != 4:
        raise ValueError(
            f"USKD.FEAT_INDEX {feat_index}: feats[{feat_index}] has shape {tuple(maps[feat_index].shape)}, "
            "not an (N, C, H, W) map"
        )
    return feat_index


def zipf_labels(scores: torch.Tensor) -> torch.Tensor:
    """``1 / (rank + 1)`` per class, rank 0 for the row's highest score (ties: lower class first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return 1.0 / (ranks + 1).float()


def uskd_loss(
    logits: torch.Tensor, weak_logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, mu: float
) -> torch.Tensor:
    """``alpha * L_t + beta * L_non + L_w`` (see the class doc); batch means, float32."""
    logits, weak_logits = logits.float(), weak_logits.float()
    rows, num_classes = target.unsqueeze(1), logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    log_p_target = log_p.gather(1, rows)
    # Soft target-class label from the student itself: p_y^2, re-centred on the batch mean at 1.
    with torch.no_grad():
        squared = F.softmax(logits, dim=1).gather(1, rows) ** 2
        soft_target = squared + 1 - squared.mean()
    loss_target = -(soft_target * log_p_target).mean()
    # The weak head against label-smoothed targets.
    smoothed = torch.full_like(weak_logits, 0.1 / num_classes).scatter_add_(
        1, rows, torch.full_like(log_p_target, 0.9)
    )
    loss_weak = -(mu * smoothed * F.log_softmax(weak_logits, dim=1)).sum(1).mean()
    # Zipf non-target labels from a ranking of the weak head's probabilities plus the student's
    # log-probabilities (the reference's choice), each normalised by its non-target mass.
    with torch.no_grad():
        p_weak = F.softmax(weak_logits, dim=1)
        scores = p_weak / (1 - p_weak.gather(1, rows) + EPS) + log_p / (1 - log_p_target + EPS)
        zipf = drop_target_column(zipf_labels(scores), target)
        zipf = zipf / zipf.sum(1, keepdim=True)
    log_q = F.log_softmax(drop_target_column(logits, target), dim=1)
    loss_non_target = -(zipf * log_q).sum(1).mean()
    return alpha * loss_target + beta * loss_non_target + loss_weak


class USKD(Distiller):
    """Cross-entropy plus USKD's self-distillation term (``cfg.USKD``), without a teacher.

    The weak head (``nn.Linear(C_mid, C)`` on the globally pooled mid-level map, see
    ``mid_feature_index``) belongs to the distiller: it is trained and checkpointed with it but is
    not part of the student, which alone is used at test time.
    """

    requires_teacher = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, cfg=None):
        super().__init__(student, ignored_teacher("USKD", teacher))
        self.alpha, self.beta, self.mu = cfg.USKD.ALPHA, cfg.USKD.BETA, cfg.USKD.MU
        self.ce_loss_weight = cfg.USKD.LOSS.CE_WEIGHT
        logits, feats = probe(student, cfg.DATASET.TYPE)
        self.feat_index = mid_feature_index(feats, cfg.USKD.FEAT_INDEX)
        self.weak_head = nn.Linear(feats["feats"][self.feat_index].shape[1], logits.shape[1])

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        return super().get_learnable_parameters() + list(self.weak_head.parameters())

    def get_extra_parameters(self) -> int:
        return count_parameters(self.weak_head)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        check_class_targets("USKD", target)
        logits, feats = self.student(image)
        weak_logits = self.weak_head(feats["feats"][self.feat_index].mean(dim=(2, 3)))
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits.float(), target),
            "loss_uskd": uskd_loss(logits, weak_logits, target, self.alpha, self.beta, self.mu),
        }
        return logits, losses_dict
