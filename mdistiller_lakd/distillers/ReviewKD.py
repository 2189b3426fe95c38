"""ReviewKD: Distilling Knowledge via Knowledge Review (Chen et al., CVPR 2021)."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import count_parameters, probe

UPSTREAM_MID_CHANNEL_CAP = 512  # upstream caps the ABFs' width at 512 whatever MAX_MID_CHANNEL says


def hcl_loss(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss: per pair, the MSE of the maps and of their 4x4, 2x2 and 1x1
    average pools (those smaller than the map), weighted 1, 1/2, 1/4, 1/8 and normalised by the
    weights' sum; summed over the pairs."""
    total = 0.0
    for f_s, f_t in zip(feats_s, feats_t):
        loss, weight, weights = F.mse_loss(f_s, f_t), 1.0, 1.0
        for size in (4, 2, 1):
            if size < f_s.shape[2]:
                weight /= 2
                pooled = [F.adaptive_avg_pool2d(f, (size, size)) for f in (f_s, f_t)]
                loss = loss + F.mse_loss(*pooled) * weight
                weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion: a 1x1 conv to ``mid_channel``, fused (when ``fuse``) with the deeper
    level's output by two spatial attention maps, then a 3x3 conv to ``out_channel``. The layout
    (``conv1``, ``conv2``, ``att_conv``) is upstream's."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, 1, bias=False), nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, 3, padding=1, bias=False), nn.BatchNorm2d(out_channel)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channel, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, shape: int, out_shape: int):
        """``(output, fused)``: ``fused`` is the residual the next, shallower level fuses."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, (shape, shape), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, :1] + residual * attention[:, 1:]
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def _sizes(feats: Sequence[torch.Tensor]) -> list[str]:
    return [f"{f.shape[1]}x{f.shape[2]}x{f.shape[3]}" for f in feats]


class ReviewKD(Distiller):
    """Review distillation (``cfg.REVIEWKD``): the student's features, deepest (the pooled feature)
    first, are fused level by level by ABFs and matched to the teacher's pre-activation stages
    after the stem and its pooled feature by the HCL loss, whose weight ramps up linearly over
    ``WARMUP_EPOCHS``.

    ``IN_CHANNELS`` and ``OUT_CHANNELS`` run from shallow to deep, ``SHAPES`` and ``OUT_SHAPES``
    from deep to shallow; a setting that does not fit the models is a ValueError at construction.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        review = cfg.REVIEWKD
        self.shapes, self.out_shapes = list(review.SHAPES), list(review.OUT_SHAPES)
        self.ce_loss_weight = review.CE_WEIGHT
        self.reviewkd_loss_weight = review.REVIEWKD_WEIGHT
        self.warmup_epochs = review.WARMUP_EPOCHS
        self.stu_preact = review.STU_PREACT
        in_channels, out_channels = list(review.IN_CHANNELS), list(review.OUT_CHANNELS)
        if review.MAX_MID_CHANNEL != UPSTREAM_MID_CHANNEL_CAP:
            warnings.warn(
                f"REVIEWKD.MAX_MID_CHANNEL {review.MAX_MID_CHANNEL} is ignored, as upstream does: the ABFs are "
                f"min({UPSTREAM_MID_CHANNEL_CAP}, IN_CHANNELS[-1]) = "
                f"{min(UPSTREAM_MID_CHANNEL_CAP, in_channels[-1])} channels wide"
            )
        self._check_settings(in_channels, out_channels, cfg.DATASET.TYPE)
        mid_channel = min(UPSTREAM_MID_CHANNEL_CAP, in_channels[-1])
        # built shallow to deep (upstream's initialisation order), kept deep to shallow (its names)
        abfs = [ABF(c_in, mid_channel, c_out, fuse=i < len(in_channels) - 1)
                for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels))]
        self.abfs = nn.ModuleList(abfs[::-1])

    def student_levels(self, feature_student: dict) -> list[torch.Tensor]:
        """The student's features the ABFs read, deepest (the pooled feature as 1x1) first."""
        feats = feature_student["preact_feats" if self.stu_preact else "feats"]
        return (feats + [feature_student["pooled_feat"][..., None, None]])[::-1]

    @staticmethod
    def teacher_levels(feature_teacher: dict) -> list[torch.Tensor]:
        """The teacher's targets, shallow to deep: pre-activation stages after the stem, pooled feature."""
        return feature_teacher["preact_feats"][1:] + [feature_teacher["pooled_feat"][..., None, None]]

    def _check_settings(self, in_channels: list, out_channels: list, dataset: str) -> None:
        """What upstream would crash on inside a convolution or an MSE, named by its key."""
        levels = len(in_channels)
        for key, values in (("OUT_CHANNELS", out_channels), ("SHAPES", self.shapes), ("OUT_SHAPES", self.out_shapes)):
            if len(values) < levels:
                raise ValueError(f"REVIEWKD.{key} has {len(values)} entries for the {levels} of REVIEWKD.IN_CHANNELS")
        student = self.student_levels(probe(self.student, dataset)[1])[:levels]
        teacher = self.teacher_levels(probe(self.teacher, dataset)[1])
        found = f"the student's features, deepest first: {_sizes(student)} (C x H x W)"
        if len(student) < levels:
            raise ValueError(f"REVIEWKD.IN_CHANNELS has {levels} entries, more than {found}")
        if [f.shape[1] for f in student] != in_channels[::-1]:
            raise ValueError(f"REVIEWKD.IN_CHANNELS {in_channels} (shallow to deep) does not fit {found}")
        if [f.shape[2] for f in student[1:]] != self.shapes[1:levels]:
            raise ValueError(f"REVIEWKD.SHAPES {self.shapes} (deep to shallow, the first unused) does not fit {found}")
        pairs = min(levels, len(teacher))
        targets = f"the teacher's targets, shallowest first: {_sizes(teacher[:pairs])} (C x H x W)"
        if out_channels[:pairs] != [f.shape[1] for f in teacher[:pairs]]:
            raise ValueError(f"REVIEWKD.OUT_CHANNELS {out_channels} (shallow to deep) does not fit {targets}")
        if self.out_shapes[:levels][::-1][:pairs] != [f.shape[2] for f in teacher[:pairs]]:
            raise ValueError(f"REVIEWKD.OUT_SHAPES {self.out_shapes} (deep to shallow) does not fit {targets}")

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        return super().get_learnable_parameters() + list(self.abfs.parameters())

    def get_extra_parameters(self) -> int:
        return count_parameters(self.abfs)

    def warmup_factor(self, epoch: float) -> float:
        return min(epoch / self.warmup_epochs, 1.0)

    def review(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The ABFs' outputs, shallow to deep."""
        outputs, residual = [], None
        for x, abf, shape, out_shape in zip(levels, self.abfs, self.shapes, self.out_shapes):
            output, residual = abf(x, residual, shape, out_shape)
            outputs.insert(0, output)
        return outputs

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, epoch: int, **kwargs):
        targets = self.teacher_levels(self.teacher_outputs(image)[1])
        logits_student, feature_student = self.student(image)
        loss_hcl = hcl_loss(self.review(self.student_levels(feature_student)), targets)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.reviewkd_loss_weight * self.warmup_factor(epoch) * loss_hcl,
        }
        return logits_student, losses_dict
