"""CIFAR VGGs with BatchNorm (vgg8, 11, 13, 16, 19): upstream mdistiller's ``vgg.py`` ``*_bn`` models.

Five blocks of 3x3 conv-BN-ReLU; each block ends at its last BN (the ReLU is applied by the
forward, so the pre-activation is available), max-pooling between blocks, global average pooling.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import init_conv_weights, init_linear_small

# Conv widths of the five blocks, by upstream's configuration letter.
CONFIGS = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100):
        super().__init__()
        self.block0 = _make_block(cfg[0], 3)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        self.stage_channels = [widths[-1] for widths in cfg]
        init_conv_weights(self)
        init_linear_small(self.classifier)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([
            self.block0, self.pool0, self.block1, self.pool1, self.block2,
            self.pool2, self.block3, self.pool3, self.block4, self.pool4,
        ])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [block[-1] for block in (self.block1, self.block2, self.block3, self.block4)]

    def get_stage_channels(self) -> list[int]:
        return self.stage_channels

    def forward(self, x: torch.Tensor):
        # Upstream pools before block4 only for 64x64 (Tiny-ImageNet) inputs: on 32x32 CIFAR
        # images block4 runs at 4x4 like block3.
        pool_before_block4 = x.shape[2] == 64
        x = F.relu(self.block0(x))
        feats, preact_feats = [x], [x]
        stages = [(self.pool0, self.block1), (self.pool1, self.block2), (self.pool2, self.block3)]
        stages.append((self.pool3 if pool_before_block4 else nn.Identity(), self.block4))
        for pool, block in stages:
            preact = block(pool(x))
            x = F.relu(preact)
            feats.append(x)
            preact_feats.append(preact)
        pooled = torch.flatten(self.pool4(x), 1)
        return self.classifier(pooled), {
            "feats": feats, "preact_feats": preact_feats, "pooled_feat": pooled,
        }


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["S"], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["A"], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["B"], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["D"], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["E"], num_classes)
