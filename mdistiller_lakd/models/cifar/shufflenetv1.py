"""CIFAR ShuffleNetV1 (``ShuffleV1``, groups 3): upstream mdistiller's ``ShuffleNetv1.py``.

A 1x1 stem (no downsampling) and three stages whose first unit halves the resolution and
concatenates its average-pooled input to the branch. Upstream applies a ReLU after the depthwise
conv too, and the stem is too narrow for grouping: the first unit's 1x1 conv is ungrouped.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ChannelShuffle, conv1x1, depthwise_conv3x3, stage_features

STEM_CHANNELS = 24


class ShuffleNetHelpers:
    """What both ShuffleNets share: a ``conv1``-``bn1`` stem, stages ``layer1..3``, upstream's
    helper methods."""

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self):
        raise NotImplementedError(
            f"{type(self).__name__} has no BatchNorm right before its stage ReLUs, so it cannot be "
            "the teacher of OFD (as upstream); pick another teacher"
        )

    def get_stage_channels(self) -> list[int]:
        return self.stage_channels

    def _run_stages(self, x: torch.Tensor) -> dict:
        stem = F.relu(self.bn1(self.conv1(x)))
        return stage_features(stem, [self.layer1, self.layer2, self.layer3])


class Bottleneck(nn.Module):
    def __init__(
        self, in_planes: int, out_planes: int, stride: int, groups: int, is_last: bool = False
    ):
        super().__init__()
        self.is_last = is_last
        self.stride = stride
        mid_planes = out_planes // 4
        first_groups = 1 if in_planes == STEM_CHANNELS else groups
        self.conv1 = conv1x1(in_planes, mid_planes, groups=first_groups)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = depthwise_conv3x3(mid_planes, stride)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = conv1x1(mid_planes, out_planes, groups=groups)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        preact = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ShuffleNet(ShuffleNetHelpers, nn.Module):
    def __init__(
        self, out_planes: list[int], num_blocks: list[int], groups: int, num_classes: int = 100
    ):
        super().__init__()
        self.conv1 = conv1x1(3, STEM_CHANNELS)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_planes = STEM_CHANNELS
        for index, (planes, count) in enumerate(zip(out_planes, num_blocks)):
            self.add_module(f"layer{index + 1}", self._make_layer(in_planes, planes, count, groups))
            in_planes = planes
        self.linear = nn.Linear(out_planes[-1], num_classes)
        # Upstream's ShuffleV1 lacks get_stage_channels; this is the analogue of its ShuffleV2's.
        self.stage_channels = [STEM_CHANNELS] + list(out_planes)

    @staticmethod
    def _make_layer(in_planes: int, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        # The first unit's branch only makes the channels its concatenated input lacks.
        blocks = [Bottleneck(in_planes, out_planes - in_planes, 2, groups, num_blocks == 1)]
        blocks += [
            Bottleneck(out_planes, out_planes, 1, groups, index == num_blocks - 1)
            for index in range(1, num_blocks)
        ]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor):
        features = self._run_stages(x)
        features["pooled_feat"] = torch.flatten(F.avg_pool2d(features["feats"][-1], 4), 1)
        return self.linear(features["pooled_feat"]), features


def ShuffleV1(num_classes: int = 100) -> ShuffleNet:
    return ShuffleNet([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)
