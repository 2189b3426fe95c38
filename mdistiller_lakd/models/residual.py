"""Residual blocks shared by the CIFAR ResNets and the ImageNet ResNets.

They are torchvision's blocks (same parameters and names, which are also upstream mdistiller's),
with one change to the output: the last block of a stage (``is_last``) returns ``(out, preact)``,
its output and the sum before the final ReLU, which ``preact_feats`` (OFD) need.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet

from .layers import conv1x1


class _PreactOutput:
    is_last = False  # a stage's last block is marked by make_stage / the model

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def _output(self, branch: torch.Tensor, x: torch.Tensor):
        preact = branch + self.residual(x)
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class BasicBlock(_PreactOutput, tv_resnet.BasicBlock):
    def forward(self, x: torch.Tensor):
        out = self.relu(self.bn1(self.conv1(x)))
        return self._output(self.bn2(self.conv2(out)), x)


class Bottleneck(_PreactOutput, tv_resnet.Bottleneck):
    """Stride on the 3x3 conv, as torchvision and upstream."""

    def forward(self, x: torch.Tensor):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._output(self.bn3(self.conv3(out)), x)


def make_stage(
    block: type, in_planes: int, planes: int, num_blocks: int, stride: int = 1
) -> nn.Sequential:
    """``num_blocks`` blocks, the first one striding and projecting (1x1 conv + BN) if shapes change."""
    out_planes = planes * block.expansion
    projection = None
    if stride != 1 or in_planes != out_planes:
        projection = nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    blocks = [block(in_planes, planes, stride, projection)]
    blocks += [block(out_planes, planes) for _ in range(num_blocks - 1)]
    blocks[-1].is_last = True
    return nn.Sequential(*blocks)


def last_bn(stage: nn.Sequential) -> nn.BatchNorm2d:
    """The BatchNorm closing the residual branch of the stage's last block (OFD's margin source)."""
    block = stage[-1]
    return block.bn3 if isinstance(block, tv_resnet.Bottleneck) else block.bn2
