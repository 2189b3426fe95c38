"""Tiny-ImageNet's MobileNetV2 (``MobileNetV2`` of ``tiny_imagenet_model_dict``): upstream
mdistiller's ``mv2_tinyimagenet.py`` architecture and state_dict names, for 64x64 images.

Full width; every conv keeps its bias (PyTorch's default init throughout, as upstream). The stem is
a 1x1 conv with padding 1 (64x64 in, 66x66 out), and the classifier is a 1x1 conv on the pooled
1280-channel head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# (repeats, output channels, first stride, expansion) of stages 2..6; stage1 and stage7 are single blocks.
STAGES = [(2, 24, 2, 6), (3, 32, 2, 6), (4, 64, 2, 6), (3, 96, 1, 6), (3, 160, 1, 6)]
HEAD_CHANNELS = 1280


class LinearBottleNeck(nn.Module):
    """1x1 expansion, depthwise 3x3, linear 1x1 projection (``residual``); the input is added back
    when the shape allows."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int = 6):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out + x if self.skip else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 200):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.stage1 = LinearBottleNeck(32, 16, 1, 1)
        in_channels = 16
        for index, (repeats, channels, stride, expansion) in enumerate(STAGES):
            blocks = [LinearBottleNeck(in_channels if i == 0 else channels, channels, stride if i == 0 else 1, expansion)
                      for i in range(repeats)]
            self.add_module(f"stage{index + 2}", nn.Sequential(*blocks))
            in_channels = channels
        self.stage7 = LinearBottleNeck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(nn.Conv2d(320, HEAD_CHANNELS, 1), nn.BatchNorm2d(HEAD_CHANNELS), nn.ReLU6(inplace=True))
        self.conv2 = nn.Conv2d(HEAD_CHANNELS, num_classes, 1)

    def forward(self, x: torch.Tensor):
        """Logits and upstream's feats: the stem, the outputs of stages 2, 3 and 4, and the head;
        ``pooled_feat`` is the pooled head, flattened to (N, 1280) like the other zoos'."""
        stem = self.pre(x)
        f1 = self.stage2(self.stage1(stem))
        f2 = self.stage3(f1)
        f3 = self.stage4(f2)
        head = self.conv1(self.stage7(self.stage6(self.stage5(f3))))
        pooled = F.adaptive_avg_pool2d(head, 1)
        logits = self.conv2(pooled).flatten(1)
        return logits, {"feats": [stem, f1, f2, f3, head], "pooled_feat": pooled.flatten(1)}


def mobilenetv2_tinyimagenet(num_classes: int = 200) -> MobileNetV2:
    return MobileNetV2(num_classes)
