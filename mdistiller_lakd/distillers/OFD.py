"""OFD: A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import batch_statistics, count_parameters


def ofd_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel margin ``E[x | x < 0]`` of the Gaussian ``N(beta, |gamma|)`` a BatchNorm before
    a ReLU produces, or ``-3|gamma|`` where fewer than 0.1% of the values are negative."""
    std = bn.weight.detach().double().abs()
    mean = bn.bias.detach().double()
    negative_mass = torch.special.ndtr(-mean / std)
    conditional_mean = (
        -std * torch.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi) / negative_mass + mean
    )
    margin = torch.where(negative_mass > 0.001, conditional_mean, -3 * std)
    return margin.float().view(1, -1, 1, 1)


def ofd_feat_loss(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """The partial L2 distance: no loss where both the teacher value is below its margin and the
    student value is below the teacher's; summed over positions, averaged over the batch."""
    loss = (
        (source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
        + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
        + (source - target) ** 2 * (target > 0).float()
    )
    return torch.abs(loss).mean(dim=0).sum()


def connector(s_channel: int, t_channel: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias) + BN from the student's channels to the teacher's; He-normal conv init."""
    conv = nn.Conv2d(
        s_channel, t_channel, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False
    )
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / fan_out))
    bn = nn.BatchNorm2d(t_channel)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


class ConnectorConvBN(nn.Module):
    """One connector per distilled stage; the layout (``connectors.<i>.{0,1}``) is upstream's."""

    def __init__(self, s_channels: Sequence[int], t_channels: Sequence[int], kernel_size: int = 1):
        super().__init__()
        self.connectors = nn.ModuleList(
            connector(s, t, kernel_size) for s, t in zip(s_channels, t_channels)
        )


def _last(n: int, *lists: Sequence) -> list[list]:
    """The last ``n`` items of each list: stages are matched from the deepest one backwards."""
    return [list(items)[-n:] for items in lists]


class OFD(Distiller):
    """Partial L2 between connected student pre-ReLU features and the teacher's (``cfg.OFD``).

    The stages after the stem are distilled, matched from the deepest backwards; stage ``i`` of
    ``n`` is weighted ``1 / 2^(n - 1 - i)``. As upstream, the teacher runs in training mode (batch
    statistics); unlike upstream its BatchNorm running statistics are left as they are.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.OFD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.OFD.LOSS.FEAT_WEIGHT
        t_channels = teacher.get_stage_channels()[1:]
        s_channels = student.get_stage_channels()[1:]
        bns = teacher.get_bn_before_relu()
        self.num_stages = min(len(t_channels), len(s_channels), len(bns))
        t_channels, s_channels, bns = _last(self.num_stages, t_channels, s_channels, bns)
        self.connectors = ConnectorConvBN(s_channels, t_channels, cfg.OFD.CONNECTOR.KERNEL_SIZE)
        # Not in the state dict (as upstream), but they follow the distiller's device.
        for i, bn in enumerate(bns):
            self.register_buffer(f"margin_{i}", ofd_margin(bn), persistent=False)

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        return super().get_learnable_parameters() + list(self.connectors.parameters())

    def get_extra_parameters(self) -> int:
        return count_parameters(self.connectors)

    def ofd_loss(self, feats_student: Sequence[torch.Tensor], feats_teacher: Sequence[torch.Tensor]):
        feats_student, feats_teacher = _last(self.num_stages, feats_student, feats_teacher)
        loss = 0
        for i, (f_s, f_t) in enumerate(zip(feats_student, feats_teacher)):
            f_s = self.connectors.connectors[i](f_s)
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:])
            margin = getattr(self, f"margin_{i}")
            loss = loss + ofd_feat_loss(f_s, f_t, margin) / 2 ** (self.num_stages - i - 1)
        return loss

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        with batch_statistics(self.teacher):
            # the distilled stages only (matched from the deepest backwards)
            preact_teacher = self.teacher_outputs(image)[1]["preact_feats"][-self.num_stages:]
        logits_student, feature_student = self.student(image)
        loss_feat = self.ofd_loss(feature_student["preact_feats"][1:], preact_teacher)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * loss_feat,
        }
        return logits_student, losses_dict
