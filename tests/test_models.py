"""The model zoos against upstream mdistiller's contract (tests/data JSON) and op order."""
import functools
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mdistiller_lakd.models import cifar_model_dict, imagenet_model_dict
from mdistiller_lakd.models.layers import ChannelShuffle

from conftest import CONTRACT_PATH, REPO_ROOT

with open(CONTRACT_PATH) as handle:
    CONTRACT = json.load(handle)["models"]
NAMES = sorted(CONTRACT)

# Upstream's get_feat_modules, as the names of the model's children it returns.
FEAT_MODULES = {
    "resnet": ["conv1", "bn1", "relu", "layer1", "layer2", "layer3"],
    "ResNet": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"],
    "wrn": ["conv1", "block1", "block2", "block3"],
    "vgg": ["block0", "pool0", "block1", "pool1", "block2", "pool2", "block3", "pool3", "block4", "pool4"],
    "Mobi": ["conv1", "blocks"],
    "Shuf": ["conv1", "bn1", "layer1", "layer2", "layer3"],
}


@functools.lru_cache(maxsize=None)
def run_cifar(name):
    """Build a CIFAR model once and run it (eval mode) on a fixed 2x3x32x32 batch."""
    torch.manual_seed(0)
    model = cifar_model_dict[name][0](num_classes=100).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
    return model, logits, feats


def shapes(tensors):
    return [list(t.shape) for t in tensors]


def test_registry_names_are_upstreams():
    assert sorted(cifar_model_dict) == NAMES
    assert sorted(imagenet_model_dict) == ["MobileNetV1", "ResNet101", "ResNet18", "ResNet34", "ResNet50"]


@pytest.mark.parametrize("name", NAMES)
def test_cifar_state_dict_is_upstreams(name):
    model = run_cifar(name)[0]
    # Same keys, shapes and order: upstream checkpoints load, registration order is upstream's.
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(
        CONTRACT[name]["state_dict"].items()
    )


@pytest.mark.parametrize("name", NAMES)
def test_cifar_outputs_are_upstreams(name):
    _, logits, feats = run_cifar(name)
    expected = CONTRACT[name]
    assert list(logits.shape) == expected["logits"]
    assert shapes(feats["feats"]) == expected["feats"]
    assert list(feats["pooled_feat"].shape) == expected["pooled_feat"]
    if "preact_feats" in expected:
        assert shapes(feats["preact_feats"]) == expected["preact_feats"]
    else:
        assert "preact_feats" not in feats


@pytest.mark.parametrize("name", NAMES)
def test_cifar_teacher_checkpoint_paths(name):
    relative = CONTRACT[name]["teacher_checkpoint"]
    expected = None if relative is None else os.path.join(REPO_ROOT, "download_ckpts", relative)
    assert cifar_model_dict[name][1] == expected


@pytest.mark.parametrize("name", NAMES)
def test_cifar_helpers_match_features(name):
    model, _, feats = run_cifar(name)
    channels = [f.shape[1] for f in feats["feats"]]
    stage_channels = model.get_stage_channels()
    assert stage_channels == channels[-len(stage_channels):]

    children = {id(module): child for child, module in model.named_children()}
    feat_modules = [children.get(id(module)) for module in model.get_feat_modules()]
    assert feat_modules == next(v for k, v in FEAT_MODULES.items() if name.startswith(k))

    if name.startswith("Shuffle"):
        with pytest.raises(NotImplementedError, match="ShuffleNet"):
            model.get_bn_before_relu()
        return
    bns = model.get_bn_before_relu()
    modules = list(model.modules())
    assert all(isinstance(bn, nn.BatchNorm2d) and any(bn is m for m in modules) for bn in bns)
    # OFD aligns them with the deepest (pre-activation) features.
    assert [bn.num_features for bn in bns] == channels[-len(bns):]


@pytest.mark.parametrize("name", ["resnet20", "ResNet50", "vgg8", "ShuffleV1", "ShuffleV2"])
def test_cifar_feats_activate_preact_feats(name):
    _, _, feats = run_cifar(name)
    for stage, (feat, preact) in enumerate(zip(feats["feats"], feats["preact_feats"])):
        if name == "ShuffleV2" and stage > 0:  # upstream shuffles the output, not the preact
            preact = ChannelShuffle(2)(preact)
        torch.testing.assert_close(feat, F.relu(preact))


@pytest.mark.parametrize("name", ["resnet8", "ResNet18", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_cifar_training_step_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = cifar_model_dict[name][0](num_classes=10).train()
    logits, feats = model(torch.randn(2, 3, 32, 32))
    (logits.sum() + sum(f.mean() for f in feats["feats"])).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def randomize_batchnorm(model):
    """Non-trivial BN statistics and affine terms, so that a misplaced BN shows."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data.copy_(torch.randn(tensor.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


class Functional:
    """conv / bn by parameter name, reading a state_dict: a forward written out op by op."""

    def __init__(self, model):
        self.params = model.state_dict()

    def conv(self, x, name, stride=1):
        weight = self.params[name + ".weight"]
        return F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)

    def bn(self, x, name):
        p = self.params
        return F.batch_norm(
            x, p[name + ".running_mean"], p[name + ".running_var"], p[name + ".weight"],
            p[name + ".bias"], training=False, eps=1e-5,
        )

    def has(self, name):
        return name + ".weight" in self.params


def assert_same_outputs(model, x, logits, feats, preact_feats, pooled):
    with torch.no_grad():
        got_logits, got = model(x)
    torch.testing.assert_close(got_logits, logits)
    torch.testing.assert_close(got["pooled_feat"], pooled)
    for name, tensors in (("feats", feats), ("preact_feats", preact_feats)):
        for got_tensor, expected_tensor in zip(got[name], tensors, strict=True):
            torch.testing.assert_close(got_tensor, expected_tensor)


def test_resnet20_op_order():
    """resnet20 = conv-bn-relu stem; per block relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut);
    feats after, preact_feats before each stage's last ReLU; 8x8 average pool; fc."""
    torch.manual_seed(0)
    model = cifar_model_dict["resnet20"][0](num_classes=100).eval()
    randomize_batchnorm(model)
    f = Functional(model)
    x = torch.randn(2, 3, 32, 32)
    out = F.relu(f.bn(f.conv(x, "conv1"), "bn1"))
    feats, preacts = [out], [out]
    for stage, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2)):
        for index in range(3):
            block = f"{stage}.{index}"
            s = stride if index == 0 else 1
            branch = F.relu(f.bn(f.conv(out, block + ".conv1", s), block + ".bn1"))
            branch = f.bn(f.conv(branch, block + ".conv2"), block + ".bn2")
            shortcut = out
            if f.has(block + ".downsample.0"):
                shortcut = f.bn(f.conv(out, block + ".downsample.0", s), block + ".downsample.1")
            preact = branch + shortcut
            out = F.relu(preact)
        feats.append(out)
        preacts.append(preact)
    pooled = F.avg_pool2d(out, 8).flatten(1)
    logits = F.linear(pooled, f.params["fc.weight"], f.params["fc.bias"])
    assert_same_outputs(model, x, logits, feats, preacts, pooled)


def test_wrn_16_1_op_order():
    """Pre-activation blocks: bn-relu-conv-bn-relu-conv plus the raw input (same width) or a 1x1
    conv of the activated input; preact_feats are the next BN applied to each stage's output."""
    torch.manual_seed(0)
    model = cifar_model_dict["wrn_16_1"][0](num_classes=100).eval()
    randomize_batchnorm(model)
    f = Functional(model)
    x = torch.randn(2, 3, 32, 32)
    out = f.conv(x, "conv1")
    feats = [out]
    for stage, stride in (("block1", 1), ("block2", 2), ("block3", 2)):
        for index in range(2):
            block = f"{stage}.layer.{index}"
            s = stride if index == 0 else 1
            activated = F.relu(f.bn(out, block + ".bn1"))
            branch = F.relu(f.bn(f.conv(activated, block + ".conv1", s), block + ".bn2"))
            branch = f.conv(branch, block + ".conv2")
            has_projection = f.has(block + ".convShortcut")
            out = branch + (f.conv(activated, block + ".convShortcut", s) if has_projection else out)
        feats.append(out)
    preacts = [feats[0], f.bn(feats[1], "block2.layer.0.bn1"), f.bn(feats[2], "block3.layer.0.bn1"), f.bn(feats[3], "bn1")]
    pooled = F.avg_pool2d(F.relu(f.bn(out, "bn1")), 8).flatten(1)
    logits = F.linear(pooled, f.params["fc.weight"], f.params["fc.bias"])
    assert_same_outputs(model, x, logits, feats, preacts, pooled)


def test_wrn_training_forward_updates_preact_bns_twice_as_upstream():
    model = cifar_model_dict["wrn_16_1"][0](num_classes=10).train()
    model(torch.randn(2, 3, 32, 32))
    assert model.block2.layer[0].bn1.num_batches_tracked.item() == 2
    assert model.bn1.num_batches_tracked.item() == 2
    assert model.block2.layer[1].bn1.num_batches_tracked.item() == 1


def test_imagenet_resnet18_is_torchvisions_with_upstreams_features():
    torch.manual_seed(0)
    model = imagenet_model_dict["ResNet18"]().eval()
    randomize_batchnorm(model)
    reference = torchvision.models.resnet18().eval()
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model(x)
        torch.testing.assert_close(logits, reference(x))
        stem = reference.relu(reference.bn1(reference.conv1(x)))
    assert shapes(feats["feats"]) == [[1, 64, 32, 32], [1, 64, 16, 16], [1, 128, 8, 8], [1, 256, 4, 4], [1, 512, 2, 2]]
    assert shapes(feats["preact_feats"]) == shapes(feats["feats"])
    torch.testing.assert_close(feats["feats"][0], stem)  # after the stem's ReLU, before max-pool
    for feat, preact in zip(feats["feats"][1:], feats["preact_feats"][1:]):
        torch.testing.assert_close(feat, F.relu(preact))
        assert preact.min() < 0
    assert list(feats["pooled_feat"].shape) == [1, 512]
    assert model.get_stage_channels() == [64, 128, 256, 512]
    assert [bn.num_features for bn in model.get_bn_before_relu()] == [128, 256, 512]
    assert model.get_bn_before_relu()[0] is model.layer2[-1].bn2


def test_imagenet_resnet50_parameters_are_torchvisions():
    model = imagenet_model_dict["ResNet50"]()
    reference = torchvision.models.resnet50()
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert model.get_stage_channels() == [256, 512, 1024, 2048]
    assert model.get_bn_before_relu()[-1] is model.layer4[-1].bn3


def test_imagenet_pretrained_loads_torchvisions_weights(monkeypatch):
    reference = torchvision.models.resnet18()
    requested = []

    def fake_download(url, *args, **kwargs):  # no network in tests
        requested.append(url)
        return reference.state_dict()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    model = imagenet_model_dict["ResNet18"](pretrained=True)
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key


def test_imagenet_pretrained_requires_1000_classes_and_existing_weights():
    with pytest.raises(ValueError, match="ResNet18.*num_classes must be 1000"):
        imagenet_model_dict["ResNet18"](pretrained=True, num_classes=10)
    with pytest.raises(ValueError, match="MobileNetV1"):
        imagenet_model_dict["MobileNetV1"](pretrained=True)


def test_imagenet_mobilenetv1_outputs_and_parameters():
    torch.manual_seed(0)
    model = imagenet_model_dict["MobileNetV1"]().eval()
    keys = list(model.state_dict())
    assert keys[:2] == ["model.0.0.weight", "model.0.1.weight"] and keys[-2:] == ["fc.weight", "fc.bias"]
    convs = [k for k in keys if k.endswith(".weight") and model.state_dict()[k].dim() == 4]
    assert convs == ["model.0.0.weight"] + [f"model.{u}.{i}.weight" for u in range(1, 14) for i in (0, 3)]
    with torch.no_grad():
        logits, feats = model(torch.randn(1, 3, 64, 64))
    assert list(logits.shape) == [1, 1000]
    assert shapes(feats["feats"]) == [[1, 128, 16, 16], [1, 256, 8, 8], [1, 512, 4, 4], [1, 1024, 2, 2]]
    assert shapes(feats["preact_feats"]) == shapes(feats["feats"])
    assert list(feats["pooled_feat"].shape) == [1, 1024]
    for feat, preact in zip(feats["feats"], feats["preact_feats"]):
        torch.testing.assert_close(feat, F.relu(preact))
    assert model.get_stage_channels() == [128, 256, 512, 1024]
    assert model.get_bn_before_relu()[0] is model.model[3][4]
