import json

import pytest
import torch
import torch.nn.functional as F

from conftest import CONTRACT_PATH
from mdistiller_lakd.lakd.cam import HeadMapHook, cat_loss, class_activation_maps, classifier_of, pooled_class_maps


def cifar_model_names():
    with open(CONTRACT_PATH) as f:
        return sorted(json.load(f)["models"])


def build(name):
    from mdistiller_lakd.models import cifar_model_dict, imagenet_model_dict

    if name in imagenet_model_dict:
        return imagenet_model_dict[name](num_classes=10), 64
    return cifar_model_dict[name][0](num_classes=10), 32


@pytest.mark.parametrize("name", cifar_model_names() + ["ResNet18", "MobileNetV1"])
def test_head_map_pools_to_the_logits(name):
    # The recorded map is what the head pools: its class maps, averaged over positions, plus the
    # classifier bias give back the model's logits. This pins the map for every family.
    torch.manual_seed(0)
    model, size = build(name)
    model.eval()
    hook = HeadMapHook(model)
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, size, size))
    classifier = classifier_of(model)
    cams = class_activation_maps(hook.map, classifier.weight)
    assert hook.map.dim() == 4 and cams.shape[:2] == (2, 10)
    torch.testing.assert_close(hook.map.mean(dim=(2, 3)), feats["pooled_feat"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + classifier.bias, logits, rtol=1e-4, atol=1e-4)
    assert hook.map.shape[-1] > 1  # a spatial map, not the pooled vector
    hook.remove()
    model(torch.randn(1, 3, size, size))
    assert hook.map is None


def test_class_maps_equal_a_bias_free_1x1_convolution():
    torch.manual_seed(0)
    feature, weight = torch.randn(3, 8, 4, 4), torch.randn(5, 8)
    expected = F.conv2d(feature, weight[:, :, None, None])
    torch.testing.assert_close(class_activation_maps(feature, weight), expected)


@pytest.mark.parametrize("resolution", [1, 2, 3])
def test_pooled_class_maps_equal_the_full_maps_pooled(resolution):
    # 3 on an 8x8 map: adaptive pooling with overlapping bins, still linear, so still equal.
    torch.manual_seed(0)
    feature, weight = torch.randn(3, 8, 8, 8), torch.randn(5, 8)
    pooled = pooled_class_maps(feature, weight, resolution)
    assert pooled.shape == (3, 5, resolution, resolution)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(class_activation_maps(feature, weight), resolution))
    # cat_loss leaves maps that are already pooled as they are
    other = torch.randn(3, 5, 8, 8)
    torch.testing.assert_close(
        cat_loss(pooled, F.adaptive_avg_pool2d(other, resolution), resolution), cat_loss(pooled, other, resolution)
    )


def test_cat_loss_is_pooled_mse():
    torch.manual_seed(0)
    cam_s, cam_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # 4x4 -> 2x2 average pooling by hand: mean of each 2x2 quadrant.
    pool = lambda x: x.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # noqa: E731
    expected = ((pool(cam_s) - pool(cam_t)) ** 2).mean()
    torch.testing.assert_close(cat_loss(cam_s, cam_t, 2), expected)

    norm = lambda x: x / x.flatten(2).norm(dim=2)[..., None, None]  # noqa: E731
    expected_normalized = ((norm(pool(cam_s)) - norm(pool(cam_t))) ** 2).mean()
    torch.testing.assert_close(cat_loss(cam_s, cam_t, 2, normalize=True), expected_normalized)


def test_cat_loss_binarizes_teacher_maps_at_their_mean_magnitude():
    cam_t = torch.tensor([[[[3.0, -1.0], [0.5, 0.5]]]])  # mean |x| = 1.25 -> only 3.0 is above
    cam_s = torch.zeros_like(cam_t)
    # binary map [[1, 0], [0, 0]] pooled to 1x1 is 0.25; loss against zeros is 0.0625
    torch.testing.assert_close(cat_loss(cam_s, cam_t, 1, binarize=True), torch.tensor(0.0625))
