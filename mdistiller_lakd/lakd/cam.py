"""Class activation maps from an unmodified model, and CAT-KD's class-attention-transfer loss.

CAT-KD replaces a model's classifier by a 1x1 convolution to read its class maps. The same maps
come from the unmodified model: its last spatial feature map and its classifier weight, no bias.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def classifier_of(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last ``nn.Linear`` (``fc``, ``linear`` or ``classifier``)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to read class maps from")
    return linears[-1]


def classifier_weight(model: nn.Module) -> torch.Tensor:
    return classifier_of(model).weight


_AVERAGE_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)


class HeadMapHook:
    """Records, during the model's normal forward, the spatial map that its classifier pools.

    The map is found from the model's structure: the top-level child registered just before the
    one holding the classifier. If that child is an average pool (ResNets, VGG, MobileNetV2,
    torchvision ResNets) or a Sequential ending in one (MobileNetV1) the map is the pool's input;
    otherwise it is that child's output (the first item
    of a ``(out, preact)`` tuple: ShuffleNetV1; WRN's final ReLU), passed through a ReLU when the
    child is a BatchNorm, whose activation the forward applies functionally (ShuffleNetV2).
    """

    def __init__(self, model: nn.Module):
        classifier = classifier_of(model)
        children = list(model.named_children())
        head = next(
            i for i, (_, child) in enumerate(children)
            if any(module is classifier for module in child.modules())
        )
        if head == 0:
            raise ValueError(f"{type(model).__name__}: no feature module precedes the classifier")
        _, source = children[head - 1]
        self.map: torch.Tensor | None = None
        if isinstance(source, nn.Sequential) and isinstance(source[-1], _AVERAGE_POOLS):
            source = source[-1]
        if isinstance(source, _AVERAGE_POOLS):
            self._handle = source.register_forward_pre_hook(self._record_input)
        else:
            self._activate = isinstance(source, nn.modules.batchnorm._BatchNorm)
            self._handle = source.register_forward_hook(self._record_output)

    def _record_input(self, module: nn.Module, inputs: tuple) -> None:
        self.map = inputs[0]

    def _record_output(self, module: nn.Module, inputs: tuple, output) -> None:
        output = output[0] if isinstance(output, tuple) else output
        self.map = F.relu(output) if self._activate else output

    def take(self) -> torch.Tensor:
        """The map of the model's last forward, released here so that it is not kept to the next."""
        recorded, self.map = self.map, None
        return recorded

    def remove(self) -> None:
        self._handle.remove()
        self.map = None


def class_activation_maps(feature: torch.Tensor, classifier_weight: torch.Tensor) -> torch.Tensor:
    """``cam[n, c, h, w] = sum_k W[c, k] * feature[n, k, h, w]`` for ``feature`` (N, K, H, W)."""
    return torch.einsum("nkhw,ck->nchw", feature, classifier_weight)


def pooled_class_maps(
    feature: torch.Tensor, classifier_weight: torch.Tensor, resolution: int
) -> torch.Tensor:
    """The class maps average-pooled to ``resolution`` x ``resolution``, without the full maps.

    Average pooling and the bias-free 1x1 convolution are both linear and commute, so pooling the
    feature first gives the pooled maps while never holding (N, classes, H, W)."""
    return class_activation_maps(F.adaptive_avg_pool2d(feature, resolution), classifier_weight)


def cat_loss(
    cam_student: torch.Tensor,
    cam_teacher: torch.Tensor,
    resolution: int,
    normalize: bool = False,
    binarize: bool = False,
) -> torch.Tensor:
    """Mean squared error between class maps average-pooled to ``resolution`` x ``resolution``
    (maps already at that resolution, from ``pooled_class_maps``, pass through the pooling as they are).

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
