"""KDSVD: Self-supervised Knowledge Distillation Using Singular Value Decomposition (Lee et al., ECCV 2018)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import probe


def finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN and infinite entries set to 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading_singular_vectors(feature: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` singular values (L2-normalised per sample, N x k) and right singular vectors
    (each L2-normalised, N x W x k) of the N x (C*H) x W matrices of a feature map, in float32."""
    n, c, h, w = feature.shape
    _, s, vh = torch.linalg.svd(feature.reshape(n, c * h, w).float(), full_matrices=False)
    s, v = finite(s), finite(vh.transpose(-2, -1))
    return F.normalize(s[:, :k], dim=1), F.normalize(v[:, :, :k], dim=1)


def align_signs(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """For each of the teacher's vectors, the student vector of largest absolute cosine with it,
    signed to agree with it (a vector with no match becomes 0): N x W x k. The selection is a
    constant of the step: gradients flow through the chosen vectors only."""
    with torch.no_grad():
        cosine = v_s.transpose(-2, -1) @ v_t
        best = cosine.abs().amax(1, keepdim=True)
        selection = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ selection


def rbf(v: torch.Tensor, v_previous: torch.Tensor) -> torch.Tensor:
    """``exp(-(v_i - u_j)^2 / 8)`` between the entries of two consecutive stages' vectors."""
    return torch.exp(-(v.unsqueeze(2) - v_previous.unsqueeze(1)).pow(2) / 8)


def kdsvd_loss(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Squared differences of the RBF correlations between consecutive stages' singular vectors
    (both scaled by the teacher's singular values), summed and averaged over the batch. The student
    keeps ``k + 3`` candidates for the ``k`` teacher vectors; non-finite terms count 0."""
    loss, previous = 0, None
    for f_s, f_t in zip(feats_s, feats_t):
        s_t, v_t = leading_singular_vectors(f_t.detach(), k)
        _, v_s = leading_singular_vectors(f_s, k + 3)
        v_s = align_signs(v_s, v_t) * s_t.unsqueeze(1)
        v_t = v_t * s_t.unsqueeze(1)
        if previous is not None:
            loss = loss + finite((rbf(v_s, previous[0]) - rbf(v_t, previous[1])).pow(2)).sum()
        previous = v_s, v_t
    return loss / feats_s[0].shape[0]


class KDSVD(Distiller):
    """SVD-based distillation over every stage output after the stem (``feats[1:]``; ``cfg.KDSVD``)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.k = cfg.KDSVD.K
        self.ce_loss_weight = cfg.KDSVD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.KDSVD.LOSS.FEAT_WEIGHT
        # consecutive stages are compared entry by entry along W: the pairs must agree in width
        widths = [[f.shape[3] for f in probe(m, cfg.DATASET.TYPE)[1]["feats"][1:]] for m in (student, teacher)]
        if any(s != t for s, t in zip(*widths)):
            raise ValueError(
                f"the student's and teacher's stages after the stem must have the same widths, pair by pair; "
                f"found {widths[0]} and {widths[1]}"
            )

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        feats_teacher = self.teacher_outputs(image)[1]["feats"][1:]
        logits_student, feature_student = self.student(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * kdsvd_loss(feature_student["feats"][1:], feats_teacher, self.k),
        }
        return logits_student, losses_dict
