"""CIFAR ResNet18 / ResNet50: upstream mdistiller's ``resnetv2.py`` (kuangliu-style ResNets).

The blocks are the shared residual blocks; only the projection's name differs: upstream calls it
``shortcut`` and keeps an empty ``nn.Sequential`` there when it is the identity.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import residual
from ..layers import init_conv_weights, stage_features
from ..residual import last_bn, make_stage


class _NamedShortcut:
    def __init__(self, in_planes: int, planes: int, stride: int = 1, projection=None):
        super().__init__(in_planes, planes, stride)
        self.shortcut = nn.Sequential() if projection is None else projection

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x)


class BasicBlock(_NamedShortcut, residual.BasicBlock):
    pass


class Bottleneck(_NamedShortcut, residual.Bottleneck):
    pass


class ResNet(nn.Module):
    def __init__(self, block: type, num_blocks: list[int], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [64, 128, 256, 512]
        in_planes = 64
        for index, (planes, count) in enumerate(zip(widths, num_blocks)):
            stride = 1 if index == 0 else 2
            self.add_module(f"layer{index + 1}", make_stage(block, in_planes, planes, count, stride))
            in_planes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(in_planes, num_classes)
        # Upstream hard-codes [256, 512, 1024, 2048], right for ResNet50 only.
        self.stage_channels = [width * block.expansion for width in widths]
        init_conv_weights(self)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, *self.stages()])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [last_bn(stage) for stage in self.stages()]

    def get_stage_channels(self) -> list[int]:
        return self.stage_channels

    def forward(self, x: torch.Tensor):
        features = stage_features(F.relu(self.bn1(self.conv1(x))), self.stages())
        features["pooled_feat"] = torch.flatten(self.avgpool(features["feats"][-1]), 1)
        return self.linear(features["pooled_feat"]), features


def ResNet18(num_classes: int = 100) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def ResNet50(num_classes: int = 100) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)
