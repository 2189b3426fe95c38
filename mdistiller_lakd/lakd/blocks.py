"""A model's block list: the units ``LAKD.LOCATIONS`` counts (1-based), read from its structure.

The list comes from the model's named children, not from this project's classes, so upstream
mdistiller's own model objects work too. Blocks in forward order, by family:

- ResNets (CIFAR ``resnet8..110``, ``resnet8x4/32x4``, ``ResNet18/50``, ImageNet/torchvision
  ResNets) and ShuffleNetV1/V2: the children of ``layer1 .. layerN`` (``layer1.0``, ``layer1.1``,
  ...): residual blocks, bottlenecks, shuffle units (ShuffleNetV2's down-sampling unit included).
  resnet20 has 9 blocks, resnet8x4 3, ResNet18 8, ShuffleV1 16, ShuffleV2 16.
- Wide ResNets (``wrn_16_2`` ...): the children of ``block1.layer .. block3.layer``
  (``block1.layer.0`` ...): wrn_16_2 has 6 blocks, wrn_40_1 18.
- VGGs: ``block0 .. block4``, 5 blocks whatever the depth (vgg8 has one conv per block). A VGG
  block ends at its last BatchNorm (or conv, without BatchNorm) and the network applies the ReLU
  functionally (``F.relu(blockK(x))``), so the cut feature is ``relu(output)``: what the network
  passes on and what ``feats`` records.
- MobileNetV2: the inverted residuals inside ``blocks`` (``blocks.0.0``, ``blocks.1.0`` ...), 17.

A block that returns ``(out, preact)`` (the last block of a stage in ResNets and ShuffleNets) is
cut at ``out``; ``replace_feature`` keeps the tuple shape.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_FAMILIES = (
    "ResNets and ShuffleNets (stages layer1..layerN), Wide ResNets (block1..blockN with .layer), "
    "VGGs (block0..block4), MobileNetV2 (blocks)"
)


def _numbered_children(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Children named ``<prefix><number>``, in number order."""
    numbered = [
        (int(match.group(1)), name, child)
        for name, child in model.named_children()
        if (match := re.fullmatch(rf"{prefix}(\d+)", name))
    ]
    return [(name, child) for _, name, child in sorted(numbered, key=lambda item: item[0])]


def _children_of(stages: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    return [(f"{name}.{index}", block) for name, stage in stages for index, block in stage.named_children()]


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks in forward order as ``(qualified name, module)``; see the module docstring.

    Raises ``ValueError`` naming the model class and the supported families for any other model.
    """
    stages = _numbered_children(model, "layer")
    if stages and all(isinstance(stage, nn.Sequential) for _, stage in stages):
        return _children_of(stages)
    stages = _numbered_children(model, "block")
    if stages and all(isinstance(getattr(stage, "layer", None), nn.Sequential) for _, stage in stages):
        return _children_of([(f"{name}.layer", stage.layer) for name, stage in stages])
    if stages and all(isinstance(stage, nn.Sequential) for _, stage in stages):
        return stages
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and all(isinstance(g, nn.Sequential) for g in blocks):
        return _children_of([(f"blocks.{index}", group) for index, group in enumerate(blocks)])
    raise ValueError(
        f"LAKD cannot find the blocks of {type(model).__name__}: supported model families are "
        f"{SUPPORTED_FAMILIES}"
    )


def relu_follows(block: nn.Module) -> bool:
    """True for a block that ends at a convolution or BatchNorm and whose ReLU the network applies
    functionally: the ``nn.Sequential`` blocks of VGGs (with or without BatchNorm)."""
    return isinstance(block, nn.Sequential) and isinstance(
        block[-1], (nn.Conv2d, nn.modules.batchnorm._BatchNorm)
    )


def block_feature(block: nn.Module, output) -> torch.Tensor:
    """The cut feature f_k in a block's output: ``out`` of ``(out, preact)``, after VGG's ReLU."""
    feature = output[0] if isinstance(output, tuple) else output
    return F.relu(feature) if relu_follows(block) else feature


def replace_feature(output, feature: torch.Tensor, detach_rest: bool = False):
    """``output`` with its feature replaced by ``feature``, a tuple kept a tuple; ``detach_rest``
    detaches the other items (``preact``) too, so nothing downstream reaches the block's graph."""
    if not isinstance(output, tuple):
        return feature
    rest = tuple(item.detach() for item in output[1:]) if detach_rest else output[1:]
    return (feature, *rest)


def stage_start_locations(block_sizes: list[Sequence[int]]) -> list[int]:
    """docs/METHOD.md's location rule (1, n+1, ..., last): the first block of every stage but the last,
    then the last block; a stage is a run of blocks with the same output (H, W)."""
    starts = [i + 1 for i, size in enumerate(block_sizes) if i == 0 or tuple(size) != tuple(block_sizes[i - 1])]
    return starts[:-1] + [len(block_sizes)]


def check_locations(
    model_name: str, num_blocks: int, locations, key: str = "LAKD.LOCATIONS", hint: str = ""
) -> list[int]:
    """``locations`` as a list, or ``ValueError`` giving the valid range for this model (and
    ``hint``)."""
    locations = list(locations)
    valid = (
        locations
        and all(isinstance(l, int) and 1 <= l <= num_blocks for l in locations)
        and all(a < b for a, b in zip(locations, locations[1:]))
        and locations[-1] == num_blocks
    )
    if not valid:
        raise ValueError(
            f"{key} {locations}: {model_name} has {num_blocks} blocks; LOCATIONS must be strictly "
            f"increasing in 1..{num_blocks} and end at {num_blocks}{hint}"
        )
    return locations
