"""Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2): upstream mdistiller's ``wrn.py``.

Pre-activation blocks (BN-ReLU-conv); a 1x1 ``convShortcut`` on the activated input where the
width or stride changes. The network's own BN-ReLU (``bn1``) follows the last stage.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import conv1x1, init_conv_weights


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else conv1x1(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # The identity shortcut carries the raw input, the projection the activated one.
        return (x if self.equalInOut else self.convShortcut(activated)) + out


class NetworkBlock(nn.Module):
    """One stage; the wrapper exists for upstream's ``blockN.layer.i`` parameter names."""

    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            BasicBlock(in_planes, out_planes, stride),
            *(BasicBlock(out_planes, out_planes, 1) for _ in range(num_layers - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int = 1, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 40), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(blocks_per_stage, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(blocks_per_stage, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(blocks_per_stage, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.stage_channels = channels
        init_conv_weights(self)
        nn.init.zeros_(self.fc.bias)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        # Each stage's output is activated by the next stage's first BN (the last one by bn1).
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def get_stage_channels(self) -> list[int]:
        return self.stage_channels

    def forward(self, x: torch.Tensor):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        pooled = torch.flatten(F.avg_pool2d(self.relu(self.bn1(f3)), 8), 1)
        logits = self.fc(pooled)
        # As upstream, the pre-activations come from calling those BNs a second time: in training
        # mode their running statistics are updated twice per step, which checkpoints reflect.
        bns = self.get_bn_before_relu()
        preact_feats = [f0] + [bn(feat) for bn, feat in zip(bns, (f1, f2, f3))]
        return logits, {"feats": [f0, f1, f2, f3], "preact_feats": preact_feats, "pooled_feat": pooled}


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
