"""ImageNet models: torchvision's ResNets and upstream mdistiller's MobileNetV1."""
from .mobilenetv1 import mobilenet_v1
from .resnet import resnet18, resnet34, resnet50, resnet101

__all__ = ["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v1"]
