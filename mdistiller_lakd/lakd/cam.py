"""Class activation maps from an unmodified model, and CAT-KD's class-attention-transfer loss.

CAT-KD replaces a model's classifier by a 1x1 convolution to read its class maps. The same maps
come from the unmodified model: its last spatial feature map and its classifier weight, no bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_activation_maps(feature: torch.Tensor, classifier_weight: torch.Tensor) -> torch.Tensor:
    """``cam[n, c, h, w] = sum_k W[c, k] * feature[n, k, h, w]`` for ``feature`` (N, K, H, W)."""
    return torch.einsum("nkhw,ck->nchw", feature, classifier_weight)


def cat_loss(
    cam_student: torch.Tensor,
    cam_teacher: torch.Tensor,
    resolution: int,
    normalize: bool = False,
    binarize: bool = False,
) -> torch.Tensor:
    """Mean squared error between class maps average-pooled to ``resolution`` x ``resolution``.

    ``binarize`` (CAT-KD's IF_BINARIZE) first turns each teacher map into 1 where it exceeds the
    map's mean absolute value and 0 elsewhere; ``normalize`` (IF_NORMALIZE) L2-normalises each
    pooled map over its positions.
    """
    if binarize:
        threshold = cam_teacher.abs().mean(dim=(2, 3), keepdim=True)
        cam_teacher = (cam_teacher > threshold).to(cam_teacher.dtype)
    pooled_student = F.adaptive_avg_pool2d(cam_student, resolution)
    pooled_teacher = F.adaptive_avg_pool2d(cam_teacher, resolution)
    if normalize:
        pooled_student = F.normalize(pooled_student, dim=(2, 3))
        pooled_teacher = F.normalize(pooled_teacher, dim=(2, 3))
    return F.mse_loss(pooled_student, pooled_teacher)
