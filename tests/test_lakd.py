"""LAKD's mechanics: NDAM's formula, block discovery, SDM's gradient isolation, eager = joint,
the unmodified student, the dry run, and the errors a user can hit."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdistiller_lakd.distillers import LAKD
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.lakd.blocks import find_blocks, relu_follows
from mdistiller_lakd.lakd.ndam import attach_ndam, ndam
from mdistiller_lakd.models import cifar_model_dict

NUM_CLASSES = 10
# resnet20 cut at [1, 4, 9]: module 1 = stem + layer1.0, module 2 = layer1.1 .. layer2.0, module 3
# = layer2.1 .. layer3.2 + fc.
MODULES_BEFORE_K = ("conv1.", "bn1.", "layer1.", "layer2.0.")
MODULE_K = ("layer2.1.", "layer2.2.", "layer3.", "fc.")


def model(name: str) -> nn.Module:
    return cifar_model_dict[name][0](num_classes=NUM_CLASSES)


def lakd_cfg(*opts, student: str = "resnet20"):
    return load_cfg(None, ["DISTILLER.TYPE", "LAKD", "DISTILLER.STUDENT", student, *opts])


def build(*opts, student: str = "resnet20", teacher: str = "resnet8", seed: int = 0) -> LAKD:
    torch.manual_seed(seed)
    return LAKD(model(student), model(teacher), lakd_cfg(*opts, student=student)).train()


def batch(size: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(size, 3, 32, 32, generator=generator)
    return image, torch.randint(0, NUM_CLASSES, (size,), generator=generator)


def train_step(distiller: LAKD, image, target) -> dict:
    """What the trainer does: zero the gradients, forward, back-propagate the sum."""
    distiller.zero_grad(set_to_none=True)
    _, losses = distiller(image=image, target=target, epoch=1)
    sum(losses.values()).backward()
    return losses


def has_gradient(parameter: nn.Parameter) -> bool:
    return parameter.grad is not None and bool(parameter.grad.any())


def student_grads(distiller: LAKD, prefixes) -> dict:
    return {
        name: has_gradient(p) for name, p in distiller.student.named_parameters() if name.startswith(prefixes)
    }


# ------------------------------------------------------------------------------------------------
# NDAM


def test_ndam_formula_on_a_hand_built_feature():
    # Two channels at two positions: channel 0 = [1, -2], channel 1 = [3, 0].
    feature = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])
    # abs: M_avg = [2, 1] / 2, M_max = [3, 2] / 3 -> A = 0.3 * [1, .5] + 0.7 * [1, 2/3]
    attention = torch.tensor([1.0, 0.15 + 0.7 * 2 / 3])
    expected = feature * (1 + attention)
    assert torch.allclose(ndam(feature, True, 0.3, 0.7), expected)
    # signed: M_avg = [2, -1] / 2, M_max = [3, 0] / 3 -> A = 0.3 * [1, -.5] + 0.7 * [1, 0]
    expected = feature * (1 + torch.tensor([1.0, -0.15]))
    assert torch.allclose(ndam(feature, False, 0.3, 0.7), expected)


def test_ndam_is_the_identity_at_zero_weights_and_on_zero_maps():
    feature = torch.randn(2, 3, 4, 4)
    assert torch.equal(ndam(feature, True, 0.0, 0.0), feature)
    assert torch.equal(ndam(torch.zeros(1, 2, 3, 3)), torch.zeros(1, 2, 3, 3))  # no 0/0
    net = model("resnet8").eval()
    assert attach_ndam(net, [1, 2, 3], abs=True, avg_weight=0.0, max_weight=0.0) == []


def test_attach_ndam_weights_the_cut_blocks_and_detaches_again():
    net = model("resnet8").eval()
    image, _ = batch()
    plain = net(image)[0]
    stage1 = net.layer1(F.relu(net.bn1(net.conv1(image))))
    handles = attach_ndam(net, [1, 3], abs=True, avg_weight=0.3, max_weight=0.7)
    assert len(handles) == 1  # at the cut k < K only
    # layer1.0 returns (out, preact): NDAM weights out, the tuple reaches the network intact.
    weighted = net(image)[1]
    assert torch.allclose(weighted["feats"][1], ndam(stage1[0], True, 0.3, 0.7))
    assert torch.equal(weighted["preact_feats"][1], stage1[1])
    for handle in handles:
        handle.remove()
    assert torch.equal(net(image)[0], plain)


# ------------------------------------------------------------------------------------------------
# Block discovery and construction errors


def test_block_lists_follow_the_model_structure():
    assert [name for name, _ in find_blocks(model("resnet20"))][:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert len(find_blocks(model("resnet20"))) == 9
    assert [name for name, _ in find_blocks(model("wrn_16_2"))][2] == "block2.layer.0"
    assert [name for name, _ in find_blocks(model("vgg8"))] == [f"block{i}" for i in range(5)]
    assert [name for name, _ in find_blocks(model("MobileNetV2"))][:3] == ["blocks.0.0", "blocks.1.0", "blocks.1.1"]
    assert len(find_blocks(model("MobileNetV2"))) == 17


def test_vgg_blocks_with_or_without_batchnorm_get_the_networks_relu():
    conv = nn.Conv2d(3, 4, 3)
    assert relu_follows(nn.Sequential(conv, nn.BatchNorm2d(4))) and relu_follows(nn.Sequential(conv))
    assert not relu_follows(nn.Sequential(conv, nn.ReLU())) and not relu_follows(model("resnet8").layer1[0])


def test_unknown_models_are_named_with_the_supported_families():
    with pytest.raises(ValueError, match=r"Sequential.*supported model families are ResNets"):
        find_blocks(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


@pytest.mark.parametrize("locations", ["[1, 4, 8]", "[4, 1, 9]", "[0, 4, 9]", "[1, 4, 4, 9]", "[1, 4, 10]"])
def test_invalid_locations_fail_with_the_valid_range(locations):
    message = r"LOCATIONS .*resnet20 has 9 blocks; LOCATIONS must be strictly increasing in 1\.\.9 and end at 9"
    with pytest.raises(ValueError, match=message + r"; LAKD's rule, .*, gives \[1, 4, 9\]"):
        build("LAKD.LOCATIONS", locations)


def test_invalid_teacher_stages_and_backward_fail_at_construction():
    with pytest.raises(ValueError, match=r"TEACHER_STAGES \[1, 7\].*each in 0\.\.3"):
        build("LAKD.TEACHER_STAGES", "[1, 7]")
    with pytest.raises(ValueError, match=r"TEACHER_STAGES \[1\]: give one index per location"):
        build("LAKD.TEACHER_STAGES", "[1]")
    with pytest.raises(ValueError, match="LAKD.BACKWARD: 'lazy'"):
        build("LAKD.BACKWARD", "lazy")
    # The last block of ShuffleV1 runs at 4x4, which resnet8 has no stage of.
    with pytest.raises(ValueError, match=r"spatial size \(4, 4\) of the student's location 3.*TEACHER_STAGES"):
        build("LAKD.LOCATIONS", "[1, 5, 16]", "LAKD.LOSS.FINAL_FEAT_WEIGHT", "1.0", student="ShuffleV1")


def test_construction_leaves_both_models_as_they_were():
    torch.manual_seed(0)
    student, teacher = model("resnet20"), model("resnet8").eval()
    student.train()
    before = [copy.deepcopy(m.state_dict()) for m in (student, teacher)]
    distiller = LAKD(student, teacher, lakd_cfg())
    for net, state in zip((student, teacher), before):
        assert all(torch.equal(state[key], value) for key, value in net.state_dict().items())
    assert student.training and not teacher.training
    # The student's state_dict is the plain model's; the connectors live on the distiller.
    assert list(student.state_dict()) == list(model("resnet20").state_dict())
    assert distiller.get_extra_parameters() == 0  # resnet8's stages match resnet20's shapes


def test_teacher_stages_are_resolution_matched_or_given():
    assert build().teacher_stages == [1, 2]  # the deepest resnet8 stage at 32x32, then at 16x16
    assert build("LAKD.TEACHER_STAGES", "[0, 2]").teacher_stages == [0, 2]


# ------------------------------------------------------------------------------------------------
# SDM


@pytest.mark.parametrize("backward", ["eager", "joint"])
def test_local_losses_train_only_the_modules_before_k(backward):
    distiller = build("LAKD.BACKWARD", backward, "LAKD.LOSS.FEAT_WEIGHT", "0.0")
    train_step(distiller, *batch())
    assert not any(student_grads(distiller, MODULES_BEFORE_K).values())
    assert all(student_grads(distiller, MODULE_K).values())


@pytest.mark.parametrize("backward", ["eager", "joint"])
def test_the_final_loss_trains_only_module_k(backward):
    distiller = build(
        "LAKD.BACKWARD", backward, "LAKD.LOSS.CE_WEIGHT", "0.0", "LAKD.LOSS.CAT_WEIGHT", "0.0",
        student="resnet20", teacher="wrn_16_2",  # other widths: connectors engaged
    )
    train_step(distiller, *batch())
    assert all(student_grads(distiller, MODULES_BEFORE_K).values())
    assert not any(student_grads(distiller, MODULE_K).values())
    assert all(has_gradient(p) for p in distiller.sdm.parameters())


def test_without_detach_the_final_loss_reaches_the_stem():
    distiller = build("LAKD.DETACH", "False", "LAKD.LOSS.FEAT_WEIGHT", "0.0")
    train_step(distiller, *batch())
    assert all(student_grads(distiller, MODULES_BEFORE_K).values())


def test_eager_and_joint_give_the_same_gradients():
    image, target = batch()
    grads = {}
    for backward in ("eager", "joint"):
        distiller = build("LAKD.BACKWARD", backward, teacher="wrn_16_2")
        losses = train_step(distiller, image, target)
        assert list(losses) == ["loss_local_1", "loss_local_2", "loss_ce", "loss_cat"]
        assert losses["loss_local_1"].requires_grad == (backward == "joint")
        parameters = [*distiller.student.named_parameters(), *distiller.sdm.named_parameters()]
        grads[backward] = {name: p.grad for name, p in parameters}
    assert grads["eager"].keys() == grads["joint"].keys()
    for name, grad in grads["eager"].items():
        assert torch.allclose(grad, grads["joint"][name], rtol=1e-5, atol=1e-7), name


def test_eager_backward_runs_before_the_next_module():
    distiller = build("LAKD.BACKWARD", "eager")
    seen = []
    distiller.student.layer3.register_forward_pre_hook(
        lambda module, inputs: seen.append(distiller.student.layer1[0].conv1.weight.grad is not None)
    )
    train_step(distiller, *batch())
    assert seen == [True]


def test_final_feature_loss_joins_the_final_objective():
    distiller = build("LAKD.LOSS.FINAL_FEAT_WEIGHT", "2.0")
    losses = train_step(distiller, *batch())
    assert list(losses) == ["loss_local_1", "loss_local_2", "loss_local_3", "loss_ce", "loss_cat"]
    assert losses["loss_local_3"].requires_grad and not losses["loss_local_2"].requires_grad


def test_vgg_is_cut_after_its_functional_relu():
    # vgg8's blocks end at a BatchNorm and the network applies the ReLU: f_1 = relu(block0(x)).
    distiller = build("LAKD.LOCATIONS", "[1, 2, 3, 5]", "LAKD.NDAM.ENABLE", "False", student="vgg8", teacher="vgg13")
    image, target = batch()
    student = copy.deepcopy(distiller.student)
    with torch.no_grad():
        expected = F.mse_loss(F.relu(student.block0(image)), distiller.teacher(image)[1]["feats"][0])
    losses = train_step(distiller, image, target)
    assert torch.allclose(losses["loss_local_1"], 100.0 * expected)


# ------------------------------------------------------------------------------------------------
# Evaluation: the student with NDAM, as tools/eval.py rebuilds it


@pytest.mark.parametrize("enable", ["True", "False"])
def test_eval_mode_is_the_plain_student_with_ndam(enable):
    distiller = build("LAKD.NDAM.ENABLE", enable)
    train_step(distiller, *batch())  # moves the BatchNorm statistics
    distiller.eval()
    image, _ = batch(seed=2)
    rebuilt = model("resnet20")
    rebuilt.load_state_dict(distiller.student.state_dict())
    extras = distiller.student_checkpoint_extras()
    assert extras == {"ndam": {"locations": [1, 4, 9], "abs": True, "avg_weight": 0.3 if enable == "True" else 0.0,
                               "max_weight": 0.7 if enable == "True" else 0.0}}
    attach_ndam(rebuilt, **extras["ndam"])
    assert torch.equal(distiller(image=image), rebuilt.eval()(image)[0])
