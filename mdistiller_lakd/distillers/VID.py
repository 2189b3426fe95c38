"""VID: Variational Information Distillation for Knowledge Transfer (Ahn et al., CVPR 2019)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import count_parameters, get_feat_shapes, pool_to_common_size


def regressor(s_channels: int, t_channels: int) -> nn.Sequential:
    """The mean of the Gaussian: three bias-free 1x1 convolutions with ReLUs between them (the
    layout, ``regressors.<i>.{0,2,4}``, is upstream's)."""
    conv = lambda c_in: nn.Conv2d(c_in, t_channels, kernel_size=1, bias=False)  # noqa: E731
    return nn.Sequential(conv(s_channels), nn.ReLU(), conv(t_channels), nn.ReLU(), conv(t_channels))


def vid_loss(
    mean_regressor: nn.Module, log_scale: torch.Tensor, f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Negative log-likelihood (constant dropped) of the teacher map under a Gaussian whose mean is
    regressed from the student map and whose per-channel variance is ``softplus(log_scale) + eps``;
    averaged over all elements. The larger map is first average-pooled to the smaller one's size."""
    f_s, f_t = pool_to_common_size(f_s, f_t.detach())
    mean = mean_regressor(f_s)
    variance = (F.softplus(log_scale) + eps).view(1, -1, 1, 1).to(mean)
    return (0.5 * ((mean - f_t) ** 2 / variance + torch.log(variance))).mean()


class VID(Distiller):
    """Variational information distillation on every stage output after the stem (``cfg.VID``).

    Each distilled stage has a regressor and a per-channel log-scale, initialised so that the
    variance starts at ``INIT_PRED_VAR``; their channels come from a probe of size ``INPUT_SIZE``.
    Upstream keeps the log-scales in a plain list, so they never train: ``VID.LEARN_VARIANCE False``
    (the default) does the same, so that results compare with upstream's; ``True`` trains them, as
    in the paper. Either way they are saved as ``log_scales.<i>``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.VID.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.VID.LOSS.FEAT_WEIGHT
        self.eps = cfg.VID.EPS
        if not cfg.VID.INIT_PRED_VAR > self.eps >= 0:
            raise ValueError(
                f"VID.INIT_PRED_VAR ({cfg.VID.INIT_PRED_VAR}) must be larger than VID.EPS ({self.eps}) >= 0: "
                "the variance starts at INIT_PRED_VAR and never falls below EPS"
            )
        try:
            feat_s_shapes, feat_t_shapes = get_feat_shapes(student, teacher, cfg.VID.INPUT_SIZE)
        except RuntimeError as error:
            raise ValueError(
                f"VID.INPUT_SIZE {tuple(cfg.VID.INPUT_SIZE)} does not fit the models (the probe of the "
                f"feature shapes failed: {error})"
            ) from None
        channels = [(s[1], t[1]) for s, t in zip(feat_s_shapes[1:], feat_t_shapes[1:])]
        self.regressors = nn.ModuleList(regressor(s, t) for s, t in channels)
        # softplus(log_scale) + eps == INIT_PRED_VAR at the start
        initial = math.log(math.exp(cfg.VID.INIT_PRED_VAR - self.eps) - 1.0)
        self.learn_variance = cfg.VID.LEARN_VARIANCE
        self.log_scales = nn.ParameterList(
            nn.Parameter(torch.full((t,), initial), requires_grad=self.learn_variance) for _, t in channels
        )

    def _trained_modules(self) -> list[nn.Module]:
        return [self.regressors, self.log_scales] if self.learn_variance else [self.regressors]

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        extra = [p for module in self._trained_modules() for p in module.parameters()]
        return super().get_learnable_parameters() + extra

    def get_extra_parameters(self) -> int:
        return count_parameters(*self._trained_modules())

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        feats_teacher = self.teacher_outputs(image)[1]["feats"][1:]
        logits_student, feature_student = self.student(image)
        stages = zip(self.regressors, self.log_scales, feature_student["feats"][1:], feats_teacher)
        loss_vid = sum(vid_loss(reg, log_scale, f_s, f_t, self.eps) for reg, log_scale, f_s, f_t in stages)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * loss_vid,
        }
        return logits_student, losses_dict
