"""CIFAR ShuffleNetV2 (``ShuffleV2``, 1x width): upstream mdistiller's ``ShuffleNetv2.py``.

A 1x1 stem (no downsampling), three stages of one down-sampling unit and n basic units, a 1x1
head conv. In a basic unit the output is channel-shuffled but, as upstream, its pre-activation
(returned by a stage's last unit) is not.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ChannelShuffle, conv1x1, depthwise_conv3x3
from .shufflenetv1 import STEM_CHANNELS, ShuffleNetHelpers


class BasicBlock(nn.Module):
    """Half the channels pass through; the other half goes 1x1 - depthwise 3x3 - 1x1."""

    def __init__(self, in_channels: int, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        half = in_channels // 2
        self.conv1 = conv1x1(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = depthwise_conv3x3(half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = conv1x1(half, half)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor):
        passed, branch = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(branch)))
        preact = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        out = self.shuffle(torch.cat([passed, F.relu(preact)], 1))
        if self.is_last:
            return out, torch.cat([passed, preact], 1)
        return out


class DownBlock(nn.Module):
    """Two strided branches of ``out_channels / 2`` each, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid_channels = out_channels // 2
        # left: depthwise 3x3 (stride 2) - 1x1
        self.conv1 = depthwise_conv3x3(in_channels, stride=2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = conv1x1(in_channels, mid_channels)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        # right: 1x1 - depthwise 3x3 (stride 2) - 1x1
        self.conv3 = conv1x1(in_channels, mid_channels)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = depthwise_conv3x3(mid_channels, stride=2)
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = conv1x1(mid_channels, mid_channels)
        self.bn5 = nn.BatchNorm2d(mid_channels)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(ShuffleNetHelpers, nn.Module):
    """``global_pool``: average the head over whatever spatial size it has (Tiny-ImageNet's 64x64
    gives 8x8) instead of upstream's fixed 4x4 window, which fits CIFAR's 32x32 only."""

    def __init__(self, out_channels: list[int], num_blocks: list[int], num_classes: int = 100,
                 global_pool: bool = False):
        super().__init__()
        self.global_pool = global_pool
        self.conv1 = conv1x1(3, STEM_CHANNELS)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_channels = STEM_CHANNELS
        for index, (channels, count) in enumerate(zip(out_channels[:3], num_blocks)):
            stage = nn.Sequential(
                DownBlock(in_channels, channels),
                *(BasicBlock(channels, is_last=i == count - 1) for i in range(count)),
            )
            self.add_module(f"layer{index + 1}", stage)
            in_channels = channels
        self.conv2 = conv1x1(in_channels, out_channels[3])
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.stage_channels = [STEM_CHANNELS] + list(out_channels[:3])

    def forward(self, x: torch.Tensor):
        features = self._run_stages(x)
        head = F.relu(self.bn2(self.conv2(features["feats"][-1])))
        pooled = F.adaptive_avg_pool2d(head, 1) if self.global_pool else F.avg_pool2d(head, 4)
        features["pooled_feat"] = torch.flatten(pooled, 1)
        return self.linear(features["pooled_feat"]), features


def ShuffleV2(num_classes: int = 100, global_pool: bool = False) -> ShuffleNetV2:
    return ShuffleNetV2([116, 232, 464, 1024], [3, 7, 3], num_classes, global_pool)
