"""CIFAR MobileNetV2 at half width (``MobileNetV2`` in the registry): upstream's ``mobile_half``.

Unlike torchvision's, every inverted residual has its 1x1 expansion conv, also at expansion 1, and
the 1280-channel head conv is not narrowed with the width multiplier.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import conv1x1, conv_bn_relu, init_conv_weights, init_linear_small


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            *conv_bn_relu(in_channels, hidden, 1),
            *conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            conv1x1(hidden, out_channels),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    # Blocks whose outputs are feats[1:]: the last one of each resolution (and of the 96-wide one).
    FEATURE_BLOCKS = (1, 2, 4, 6)

    def __init__(self, expand_ratio: int, width_mult: float, num_classes: int = 100):
        super().__init__()
        settings = [  # expansion, channels, blocks, first stride
            (1, 16, 1, 1),
            (expand_ratio, 24, 2, 1),
            (expand_ratio, 32, 3, 2),
            (expand_ratio, 64, 4, 2),
            (expand_ratio, 96, 3, 1),
            (expand_ratio, 160, 3, 2),
            (expand_ratio, 320, 1, 1),
        ]
        channels = int(32 * width_mult)
        self.stage_channels = [channels]
        self.conv1 = conv_bn_relu(3, channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for index, (expansion, width, count, stride) in enumerate(settings):
            out_channels = int(width * width_mult)
            layers = []
            for block_stride in [stride] + [1] * (count - 1):
                layers.append(InvertedResidual(channels, out_channels, block_stride, expansion))
                channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
            if index in self.FEATURE_BLOCKS:
                self.stage_channels.append(out_channels)
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last_channels, 1)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        # Sized for 32x32 inputs, whose last map is 2x2 (as upstream, registered after the head).
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)
        init_conv_weights(self)
        init_linear_small(self.classifier[0])

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.blocks])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.blocks[index][-1].conv[-1] for index in self.FEATURE_BLOCKS]

    def get_stage_channels(self) -> list[int]:
        return self.stage_channels

    def forward(self, x: torch.Tensor):
        x = self.conv1(x)
        feats = [x]
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.FEATURE_BLOCKS:
                feats.append(x)
        pooled = torch.flatten(self.avgpool(self.conv2(x)), 1)
        # No "preact_feats", as upstream.
        return self.classifier(pooled), {"feats": feats, "pooled_feat": pooled}


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(expand_ratio=6, width_mult=0.5, num_classes=num_classes)
