"""What the analyses read out of a model over a set of images: stage outputs (as Gram matrices for
CKA) and the spatial and class maps of the map its classifier pools."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..lakd.cam import HeadMapHook, class_activation_maps, classifier_weight
from .cka import gram_linear


@torch.no_grad()
def stage_grams(model: nn.Module, batches: Iterable, device: torch.device) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The linear Gram matrix of every stage output ``feats["feats"][i]`` over all images of
    ``batches`` (``(image, target)`` pairs), and each stage's per-image shape."""
    per_stage: list[list[torch.Tensor]] = []
    for image, _ in batches:
        _, feats = model(image.float().to(device))
        if not per_stage:
            per_stage = [[] for _ in feats["feats"]]
        for collected, feature in zip(per_stage, feats["feats"]):
            collected.append(feature.float().cpu())
    stages = [torch.cat(collected) for collected in per_stage]
    return [gram_linear(stage) for stage in stages], [list(stage.shape[1:]) for stage in stages]


@torch.no_grad()
def head_maps(model: nn.Module, image: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """For each image, from the spatial map that the classifier pools (``HeadMapHook``):
    ``activation``: mean absolute activation over channels; ``class_map``: the class activation map
    of the true class (``target``); ``prediction``: the top-1 class. Maps are (N, h, w), on the CPU."""
    hook = HeadMapHook(model)
    try:
        logits, _ = model(image)
        feature = hook.map
    finally:
        hook.remove()
    class_maps = class_activation_maps(feature, classifier_weight(model))
    true_class = class_maps[torch.arange(len(target)), target.to(class_maps.device)]
    return {
        "activation": feature.abs().mean(dim=1).float().cpu(),
        "class_map": true_class.float().cpu(),
        "prediction": logits.argmax(dim=1).cpu(),
    }
