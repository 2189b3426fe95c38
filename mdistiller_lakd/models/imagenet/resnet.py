"""ImageNet ResNets: torchvision's (same parameters, ``pretrained`` loads torchvision's weights)
returning upstream mdistiller's ``(logits, feats)``.

feats["feats"]: the stem after its ReLU (before the max-pool), then each stage's output;
feats["preact_feats"]: the stem again, then each stage's sum before its last ReLU. (Upstream
means the stem before its ReLU there but records it after, through an in-place ReLU; we keep
the values upstream produces.)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import resnet as tv_resnet

from ..layers import stage_features
from ..residual import BasicBlock, Bottleneck, last_bn


class ResNet(tv_resnet.ResNet):
    def __init__(self, block: type, layers: list[int], num_classes: int = 1000):
        super().__init__(block, layers, num_classes=num_classes)
        for stage in self.stages():
            stage[-1].is_last = True

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        # Upstream leaves out layer1's.
        return [last_bn(stage) for stage in self.stages()[1:]]

    def get_stage_channels(self) -> list[int]:
        # Upstream hard-codes [256, 512, 1024, 2048], right for the bottleneck ResNets only.
        return [last_bn(stage).num_features for stage in self.stages()]

    def forward(self, x: torch.Tensor):
        stem = self.relu(self.bn1(self.conv1(x)))
        features = stage_features(stem, self.stages(), stage_input=self.maxpool(stem))
        features["pooled_feat"] = torch.flatten(self.avgpool(features["feats"][-1]), 1)
        return self.fc(features["pooled_feat"]), features


def _build(
    block: type, layers: list[int], weights: type[tv_resnet.WeightsEnum], pretrained: bool,
    num_classes: int,
) -> ResNet:
    name = weights.__name__.split("_")[0]  # ResNet18_Weights -> ResNet18
    if pretrained and num_classes != 1000:
        raise ValueError(
            f"{name}: pretrained=True loads torchvision's 1000-class ImageNet weights; "
            f"num_classes must be 1000, got {num_classes}"
        )
    model = ResNet(block, layers, num_classes)
    if pretrained:
        model.load_state_dict(weights.IMAGENET1K_V1.get_state_dict(progress=True))
    return model


def resnet18(pretrained: bool = False, num_classes: int = 1000) -> ResNet:
    return _build(BasicBlock, [2, 2, 2, 2], tv_resnet.ResNet18_Weights, pretrained, num_classes)


def resnet34(pretrained: bool = False, num_classes: int = 1000) -> ResNet:
    return _build(BasicBlock, [3, 4, 6, 3], tv_resnet.ResNet34_Weights, pretrained, num_classes)


def resnet50(pretrained: bool = False, num_classes: int = 1000) -> ResNet:
    return _build(Bottleneck, [3, 4, 6, 3], tv_resnet.ResNet50_Weights, pretrained, num_classes)


def resnet101(pretrained: bool = False, num_classes: int = 1000) -> ResNet:
    return _build(Bottleneck, [3, 4, 23, 3], tv_resnet.ResNet101_Weights, pretrained, num_classes)
