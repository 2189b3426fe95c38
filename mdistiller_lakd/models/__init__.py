"""The model zoos: ``cifar_model_dict[name]`` and ``tiny_imagenet_model_dict[name]`` =
``(constructor, teacher_checkpoint_or_None)``, and ``imagenet_model_dict[name] = constructor``, with
upstream mdistiller's names.

Teacher checkpoints live where upstream keeps them, ``<repo>/download_ckpts/cifar_teachers/``
(the extracted ``cifar_teachers.tar`` of upstream's release) and
``<repo>/download_ckpts/tiny_imagenet_teachers/ResNet18_vanilla/ti_res18``.
"""
import os

from .cifar import (
    ResNet18, ResNet50, ShuffleV1, ShuffleV2, mobile_half, resnet8, resnet8x4, resnet14, resnet20,
    resnet32, resnet32x4, resnet44, resnet56, resnet110, vgg8, vgg11, vgg13, vgg16, vgg19,
    wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2,
)
from .imagenet import mobilenet_v1, resnet18, resnet34, resnet50, resnet101
from .tiny_imagenet import mobilenetv2_tinyimagenet, shufflev2_tinyimagenet

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cifar100_model_prefix = os.path.join(REPO_ROOT, "download_ckpts", "cifar_teachers")
tiny_imagenet_model_prefix = os.path.join(REPO_ROOT, "download_ckpts", "tiny_imagenet_teachers")


def _teacher(name: str) -> str:
    return os.path.join(cifar100_model_prefix, f"{name}_vanilla", "ckpt_epoch_240.pth")


cifar_model_dict = {
    # teachers
    "resnet56": (resnet56, _teacher("resnet56")),
    "resnet110": (resnet110, _teacher("resnet110")),
    "resnet32x4": (resnet32x4, _teacher("resnet32x4")),
    "ResNet50": (ResNet50, _teacher("ResNet50")),
    "wrn_40_2": (wrn_40_2, _teacher("wrn_40_2")),
    "vgg13": (vgg13, _teacher("vgg13")),
    # students
    "resnet8": (resnet8, None),
    "resnet14": (resnet14, None),
    "resnet20": (resnet20, None),
    "resnet32": (resnet32, None),
    "resnet44": (resnet44, None),
    "resnet8x4": (resnet8x4, None),
    "ResNet18": (ResNet18, None),
    "wrn_16_1": (wrn_16_1, None),
    "wrn_16_2": (wrn_16_2, None),
    "wrn_40_1": (wrn_40_1, None),
    "vgg8": (vgg8, None),
    "vgg11": (vgg11, None),
    "vgg16": (vgg16, None),
    "vgg19": (vgg19, None),
    "MobileNetV2": (mobile_half, None),
    "ShuffleV1": (ShuffleV1, None),
    "ShuffleV2": (ShuffleV2, None),
}

tiny_imagenet_model_dict = {
    "ResNet18": (ResNet18, os.path.join(tiny_imagenet_model_prefix, "ResNet18_vanilla", "ti_res18")),
    "MobileNetV2": (mobilenetv2_tinyimagenet, None),
    "ShuffleV2": (shufflev2_tinyimagenet, None),
}

imagenet_model_dict = {
    "ResNet18": resnet18,
    "ResNet34": resnet34,
    "ResNet50": resnet50,
    "ResNet101": resnet101,
    "MobileNetV1": mobilenet_v1,
}


def zoo_of(dataset: str) -> dict:
    """The ``(constructor, teacher_checkpoint)`` zoo of a 32x32 or 64x64 DATASET.TYPE."""
    return tiny_imagenet_model_dict if dataset == "tiny_imagenet" else cifar_model_dict
