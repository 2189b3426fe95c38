"""ImageNet MobileNetV1: upstream mdistiller's ``mobilenetv1.py`` (a student of ResNet50).

``model`` holds the stem, 13 depthwise-separable units and the average pool, as upstream, so
upstream checkpoints load. Features are the pre-ReLU outputs of units 3, 5, 11 and 13, the last
unit at each resolution from 56x56 down to 7x7 (for 224x224 inputs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import conv_bn_relu

# (in, out, stride) of the depthwise-separable units 1..13
_UNITS = [
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
    *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1),
]


def _depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        *conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels),
        *conv_bn_relu(in_channels, out_channels, 1),
    )


class MobileNetV1(nn.Module):
    STAGE_ENDS = (3, 5, 11, 13)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.model = nn.Sequential(
            conv_bn_relu(3, 32, 3, stride=2),
            *(_depthwise_separable(*unit) for unit in _UNITS),
            # Upstream's AvgPool2d(7) for 224x224 inputs; adaptive so smaller inputs work too.
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(1024, num_classes)

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.model[end][-2] for end in self.STAGE_ENDS]

    def get_stage_channels(self) -> list[int]:
        return [bn.num_features for bn in self.get_bn_before_relu()]

    def forward(self, x: torch.Tensor):
        preact_feats = []
        start = 0
        for end in self.STAGE_ENDS:
            # Units start..end, the last one without its ReLU, which the next stage applies.
            preact = self.model[end][:-1](self.model[start:end](x))
            preact_feats.append(preact)
            x = F.relu(preact)
            start = end + 1
        pooled = torch.flatten(self.model[-1](x), 1)
        feats = [F.relu(preact) for preact in preact_feats]
        return self.fc(pooled), {
            "feats": feats, "preact_feats": preact_feats, "pooled_feat": pooled,
        }


def mobilenet_v1(pretrained: bool = False, num_classes: int = 1000) -> MobileNetV1:
    if pretrained:
        raise ValueError(
            "MobileNetV1: there are no pretrained ImageNet weights for it here (torchvision has "
            "none); train it, or load a checkpoint of upstream's into the model"
        )
    return MobileNetV1(num_classes)
