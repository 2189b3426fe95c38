"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4): upstream mdistiller's ``resnet.py``.

Three stages of ``(depth - 2) / 6`` basic blocks after a 3x3 stem; ``num_filters`` gives the stem's
and the stages' widths.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import init_conv_weights, stage_features
from ..residual import BasicBlock, last_bn, make_stage


class ResNet(nn.Module):
    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_stage(BasicBlock, num_filters[0], num_filters[1], blocks_per_stage)
        self.layer2 = make_stage(BasicBlock, num_filters[1], num_filters[2], blocks_per_stage, 2)
        self.layer3 = make_stage(BasicBlock, num_filters[2], num_filters[3], blocks_per_stage, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)
        self.stage_channels = list(num_filters)
        init_conv_weights(self)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList(
            [self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3]
        )

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [last_bn(stage) for stage in (self.layer1, self.layer2, self.layer3)]

    def get_stage_channels(self) -> list[int]:
        return self.stage_channels

    def forward(self, x: torch.Tensor):
        stem = self.relu(self.bn1(self.conv1(x)))
        features = stage_features(stem, [self.layer1, self.layer2, self.layer3])
        features["pooled_feat"] = torch.flatten(self.avgpool(features["feats"][-1]), 1)
        return self.fc(features["pooled_feat"]), features


def resnet8(num_classes: int = 100) -> ResNet:
    return ResNet(8, [16, 16, 32, 64], num_classes)


def resnet14(num_classes: int = 100) -> ResNet:
    return ResNet(14, [16, 16, 32, 64], num_classes)


def resnet20(num_classes: int = 100) -> ResNet:
    return ResNet(20, [16, 16, 32, 64], num_classes)


def resnet32(num_classes: int = 100) -> ResNet:
    return ResNet(32, [16, 16, 32, 64], num_classes)


def resnet44(num_classes: int = 100) -> ResNet:
    return ResNet(44, [16, 16, 32, 64], num_classes)


def resnet56(num_classes: int = 100) -> ResNet:
    return ResNet(56, [16, 16, 32, 64], num_classes)


def resnet110(num_classes: int = 100) -> ResNet:
    return ResNet(110, [16, 16, 32, 64], num_classes)


def resnet8x4(num_classes: int = 100) -> ResNet:
    return ResNet(8, [32, 64, 128, 256], num_classes)


def resnet32x4(num_classes: int = 100) -> ResNet:
    return ResNet(32, [32, 64, 128, 256], num_classes)
