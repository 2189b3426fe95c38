"""Tiny-ImageNet models (64x64 images, 200 classes) with upstream mdistiller's state_dict names:
its ``tiny_imagenet_model_dict`` takes ResNet18 and ShuffleV2 from the CIFAR zoo (ShuffleV2 here
pooling globally, so that it runs at 64x64) and a full-width MobileNetV2 of its own."""
from __future__ import annotations

from ..cifar import ShuffleV2
from .mobilenetv2 import MobileNetV2, mobilenetv2_tinyimagenet


def shufflev2_tinyimagenet(num_classes: int = 200):
    """Upstream's ShuffleV2 (same parameters), its head averaged over the whole 8x8 map."""
    return ShuffleV2(num_classes, global_pool=True)


__all__ = ["MobileNetV2", "mobilenetv2_tinyimagenet", "shufflev2_tinyimagenet"]
