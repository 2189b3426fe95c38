"""Layer builders shared by several model families."""
from __future__ import annotations

import torch
import torch.nn as nn


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride, groups=groups, bias=False)


def depthwise_conv3x3(channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (same padding, no bias), BatchNorm, in-place ReLU: indices 0, 1, 2 in the state_dict."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2,
            groups=groups, bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def init_conv_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out) with zero bias: upstream's init for most families.

    BatchNorm needs nothing: PyTorch already starts it at weight 1, bias 0.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def init_linear_small(linear: nn.Linear, std: float = 0.01) -> None:
    """VGG's and MobileNetV2's classifier init."""
    nn.init.normal_(linear.weight, 0.0, std)
    nn.init.zeros_(linear.bias)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: view the channels as (groups, C/groups) and transpose."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def stage_features(
    stem_out: torch.Tensor, stages: list[nn.Module], stage_input: torch.Tensor | None = None
) -> dict:
    """Runs ``stages``, whose last blocks return ``(out, preact)``, after the stem.

    Returns upstream's feature dict without the pooled feature: ``feats`` (the stem output, then
    each stage's output) and ``preact_feats`` (the stem output, then each stage's pre-ReLU sum).
    ``stage_input`` is what the first stage reads when it is not the stem output.
    """
    x = stem_out if stage_input is None else stage_input
    feats, preact_feats = [stem_out], [stem_out]
    for stage in stages:
        x, preact = stage(x)
        feats.append(x)
        preact_feats.append(preact)
    return {"feats": feats, "preact_feats": preact_feats}
