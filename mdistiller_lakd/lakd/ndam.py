"""Non-Directional Activation Mapping (NDAM): a parameter-free re-weighting of the feature that
enters the next local module (docs/METHOD.md, "Non-Directional Activation Mapping").

    M_avg = mean_c |f|,  M_max = max_c |f|                       (per position)
    A     = avg_weight * M_avg / max_hw(M_avg) + max_weight * M_max / max_hw(M_max)
    f'    = f * (1 + A)

``abs=False`` drops the absolute value. NDAM is part of the student's forward, train and test
alike, so a student trained with it is evaluated with it: ``attach_ndam`` puts it on a plain model
(tools/eval.py does so from a student checkpoint's ``"ndam"`` entry).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .blocks import block_feature, check_locations, find_blocks, replace_feature


def _normalized(activation: torch.Tensor) -> torch.Tensor:
    """``activation / max_hw(activation)`` per sample; an all-zero map stays zero (no 0/0)."""
    peak = activation.amax(dim=(2, 3), keepdim=True)
    return activation / torch.where(peak == 0, torch.ones_like(peak), peak)


def ndam(feature: torch.Tensor, abs: bool = True, avg_weight: float = 0.3, max_weight: float = 0.7) -> torch.Tensor:
    """``feature * (1 + A)`` for an (N, C, H, W) feature; the identity when both weights are 0."""
    magnitude = feature.abs() if abs else feature
    attention = avg_weight * _normalized(magnitude.mean(dim=1, keepdim=True))
    attention = attention + max_weight * _normalized(magnitude.amax(dim=1, keepdim=True))
    return feature * (1 + attention)


def attach_ndam(
    model: nn.Module, locations: Sequence[int], abs: bool, avg_weight: float, max_weight: float
) -> list[RemovableHandle]:
    """Apply NDAM to the output of the blocks at ``locations[:-1]`` (1-based, LAKD's cuts; the last
    location is the model's last block, which gets none) in every forward of ``model``.

    Returns the hooks' handles (``handle.remove()`` detaches NDAM again); none when both weights
    are 0, where NDAM is the identity.
    """
    blocks = find_blocks(model)
    locations = check_locations(type(model).__name__, len(blocks), locations, key="ndam locations")
    if avg_weight == 0 and max_weight == 0:
        return []

    def weight_output(block: nn.Module, inputs: tuple, output):
        feature = ndam(block_feature(block, output), abs, avg_weight, max_weight)
        return replace_feature(output, feature)

    return [blocks[location - 1][1].register_forward_hook(weight_output) for location in locations[:-1]]
