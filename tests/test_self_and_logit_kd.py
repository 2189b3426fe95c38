"""NKD, USKD and PS-KD: golden values of each loss computed by hand on tiny logits (plain-Python
softmax sums, noted next to each number), the detach points, USKD's mid-feature rule on every zoo
family, PS-KD's schedule and prediction buffer, teacherless building, bad input, and every shipped
config building and training one step."""
import glob
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT
from mdistiller_lakd.distillers import NKD, PSKD, USKD, distiller_dict
from mdistiller_lakd.distillers._common import probe
from mdistiller_lakd.distillers.NKD import nkd_loss
from mdistiller_lakd.distillers.USKD import mid_feature_index, uskd_loss, zipf_labels
from mdistiller_lakd.engine.build import build_distiller
from mdistiller_lakd.engine.cfg import ConfigError, load_cfg
from mdistiller_lakd.models import cifar_model_dict, imagenet_model_dict


def cfg_with(*opts):
    return load_cfg(None, list(opts))


def resnet8(num_classes=10):
    torch.manual_seed(0)
    return cifar_model_dict["resnet8"][0](num_classes=num_classes)


# --------------------------------------------------------------------------------------------------
# NKD

# 2 x 4 logits, labels [1, 2], T = 2. By hand: target term -(1/2) sum_n p^t_{n,y} log p^s_{n,y}
# = 0.2936276283521129; non-target term per unit gamma: the T^2-scaled cross-entropy of the
# teacher's and student's softmax(./T) over the three other classes, batch mean = 4.235040182946082.
NKD_STUDENT = [[1.0, 2.0, 0.0, -1.0], [0.5, -0.5, 1.5, 0.0]]
NKD_TEACHER = [[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, -1.0]]
NKD_TARGET = [1, 2]
NKD_TARGET_TERM, NKD_NON_TARGET_PER_GAMMA = 0.2936276283521129, 4.235040182946082


@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_nkd_loss_golden_terms(gamma):
    loss = nkd_loss(torch.tensor(NKD_STUDENT), torch.tensor(NKD_TEACHER), torch.tensor(NKD_TARGET), 2.0, gamma)
    assert loss.item() == pytest.approx(NKD_TARGET_TERM + gamma * NKD_NON_TARGET_PER_GAMMA, rel=1e-6)


def test_nkd_at_t1_and_gamma0_is_the_target_term_with_the_teacher_detached():
    student = torch.tensor(NKD_STUDENT, requires_grad=True)
    teacher = torch.tensor(NKD_TEACHER, requires_grad=True)
    target = torch.tensor(NKD_TARGET)
    loss = nkd_loss(student, teacher, target, 1.0, 0.0)
    assert loss.item() == pytest.approx(NKD_TARGET_TERM, rel=1e-6)
    loss.backward()
    # d/dz of -(1/N) p^t_y log softmax(z)_y with p^t_y a constant: -(1/N) p^t_y (onehot - p^s).
    p_teacher_y = F.softmax(teacher.detach(), 1).gather(1, target[:, None])
    expected = -(p_teacher_y / 2) * (F.one_hot(target, 4) - F.softmax(student.detach(), 1))
    torch.testing.assert_close(student.grad, expected)
    assert teacher.grad is None  # a missing detach would send a gradient to the teacher's logits


def test_nkd_distiller_losses_and_frozen_teacher():
    cfg = cfg_with("NKD.LOSS.CE_WEIGHT", 0.5, "NKD.LOSS.NKD_WEIGHT", 2.0)
    teacher = cifar_model_dict["resnet14"][0](num_classes=10)
    distiller = NKD(resnet8(), teacher, cfg).train()
    image, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, 3])
    logits, losses = distiller(image=image, target=target, epoch=1)
    assert set(losses) == {"loss_ce", "loss_nkd"} and logits.shape == (4, 10)
    with torch.no_grad():
        logits_teacher = teacher(image)[0]
    torch.testing.assert_close(losses["loss_ce"], 0.5 * F.cross_entropy(logits, target))
    torch.testing.assert_close(losses["loss_nkd"], 2.0 * nkd_loss(logits, logits_teacher, target, 3.0, 3.5))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert distiller.get_extra_parameters() == 0


def test_nkd_needs_a_teacher():
    with pytest.raises(ValueError, match=r"DISTILLER.TEACHER"):
        NKD(resnet8(), None, cfg_with())


# --------------------------------------------------------------------------------------------------
# USKD


def test_zipf_labels_follow_the_ranking_with_stable_ties():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2], [1.0, 2.0, 1.0, 2.0, 0.0]])
    expected = torch.tensor([[1 / 5, 1 / 2, 1 / 3, 1, 1 / 4], [1 / 3, 1, 1 / 4, 1 / 2, 1 / 5]])
    torch.testing.assert_close(zipf_labels(scores), expected)


def test_uskd_non_target_term_skips_the_labels_zipf_value():
    # Uniform weak logits: the ranking is the student's logit order, 3 > 1 > 2 > 4 > 0, so the
    # Zipf labels are [1/5, 1/2, 1/3, 1, 1/4]; label 1 drops 1/2 and the rest is renormalised:
    # [0.2, 1/3, 1, 0.25] / 1.78333. L_non = -sum uhat_j log softmax([0.1, 0.3, 0.9, 0.2])_j
    # = 1.21417886505347 (by hand).
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2]])
    loss = uskd_loss(logits, torch.zeros(1, 5), torch.tensor([1]), alpha=0.0, beta=1.0, mu=0.0)
    assert loss.item() == pytest.approx(1.21417886505347, rel=1e-6)


def test_uskd_target_and_weak_terms_golden_and_the_soft_label_detached():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]], requires_grad=True)
    weak = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    target = torch.tensor([0, 2])
    # By hand: a_n = p_{n,y}^2, s_n = a_n + 1 - mean(a) = [1.308810120868031, 0.6911898791319694],
    # L_t = -(1/2) sum s_n log p_{n,y} = 0.5190433201892031; L_w with MU 0.1 and the 0.9 / 0.1/C
    # targets = 0.049549474007696784.
    loss_target = uskd_loss(logits, weak, target, alpha=1.0, beta=0.0, mu=0.0)
    assert loss_target.item() == pytest.approx(0.5190433201892031, rel=1e-6)
    loss_weak = uskd_loss(logits.detach(), weak, target, alpha=0.0, beta=0.0, mu=0.1)
    assert loss_weak.item() == pytest.approx(0.049549474007696784, rel=1e-6)
    # s_n is a constant: the gradient is -(1/N) s_n (onehot - p). Without the detach the value
    # would be the same but the gradient would also flow through s_n.
    loss_target.backward()
    soft = torch.tensor([[1.308810120868031], [0.6911898791319694]])
    expected = -(soft / 2) * (F.one_hot(target, 3) - F.softmax(logits.detach(), 1))
    torch.testing.assert_close(logits.grad, expected)


# C_mid per zoo model (probe at 32 x 32; ImageNet models at 224): the reference's fea_s[-2].
CIFAR_MID_CHANNELS = {
    "resnet8": 32, "resnet14": 32, "resnet20": 32, "resnet32": 32, "resnet44": 32, "resnet56": 32, "resnet110": 32,
    "resnet8x4": 128, "resnet32x4": 128, "ResNet18": 256, "ResNet50": 1024, "wrn_16_1": 32, "wrn_40_1": 32,
    "wrn_16_2": 64, "wrn_40_2": 64, "vgg8": 512, "vgg11": 512, "vgg13": 512, "vgg16": 512, "vgg19": 512,
    "MobileNetV2": 160, "ShuffleV1": 480, "ShuffleV2": 464,
}


def test_every_cifar_zoo_model_is_covered():
    assert set(CIFAR_MID_CHANNELS) == set(cifar_model_dict)


@pytest.mark.parametrize("name", sorted(CIFAR_MID_CHANNELS))
def test_uskd_weak_head_on_every_cifar_family_stays_outside_the_student(name):
    student = cifar_model_dict[name][0](num_classes=100)
    distiller = USKD(student, None, cfg_with())
    channels = CIFAR_MID_CHANNELS[name]
    assert distiller.weak_head.in_features == channels and distiller.weak_head.out_features == 100
    assert distiller.feat_index == (-1 if name in ("MobileNetV2", "ShuffleV2") else -2)
    assert distiller.get_extra_parameters() == channels * 100 + 100
    assert not any(key.startswith("weak_head") for key in student.state_dict())
    assert {"weak_head.weight", "weak_head.bias"} <= set(distiller.state_dict())
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert {id(p) for p in distiller.weak_head.parameters()} <= learnable


@pytest.mark.parametrize("name,channels", [("ResNet18", 256), ("MobileNetV1", 512)])
def test_uskd_mid_feature_on_imagenet_models(name, channels):
    model = imagenet_model_dict[name](pretrained=False)
    _, feats = probe(model, "imagenet")
    assert feats["feats"][mid_feature_index(feats, None)].shape[1] == channels


def test_the_probe_leaves_the_student_and_the_rng_untouched():
    student = resnet8().train()
    before = {key: value.clone() for key, value in student.state_dict().items()}
    rng = torch.get_rng_state()
    probe(student, "cifar100")
    assert torch.equal(torch.get_rng_state(), rng) and student.training
    USKD(student, None, cfg_with())  # the weak head's initialisation draws; the student stays as it was
    assert all(torch.equal(before[key], value) for key, value in student.state_dict().items())


def test_uskd_weak_term_trains_the_head_and_the_stages_up_to_the_mid_feature():
    cfg = cfg_with("USKD.ALPHA", 0.0, "USKD.BETA", 0.0, "USKD.LOSS.CE_WEIGHT", 0.0)
    distiller = USKD(resnet8(), None, cfg).train()
    _, losses = distiller(image=torch.randn(4, 3, 32, 32), target=torch.tensor([0, 1, 2, 3]), epoch=1)
    assert set(losses) == {"loss_ce", "loss_uskd"}
    sum(losses.values()).backward()
    student = distiller.student
    # feats[-2] of resnet8 is layer2's output: layer2 and below learn from the weak head, layer3 not.
    for module in (distiller.weak_head, student.conv1, student.layer1, student.layer2):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in student.layer3.parameters())


def test_uskd_feat_index_override_and_errors():
    distiller = USKD(resnet8(), None, cfg_with("USKD.FEAT_INDEX", 1))
    assert distiller.weak_head.in_features == 16  # layer1
    with pytest.raises(ValueError, match=r"USKD.FEAT_INDEX 7 is outside the model's 4 feature maps"):
        USKD(resnet8(), None, cfg_with("USKD.FEAT_INDEX", 7))
    cfg = cfg_with("DISTILLER.TYPE", "USKD", "DISTILLER.STUDENT", "resnet8", "USKD.FEAT_INDEX", -5)
    with pytest.raises(ConfigError, match=r"^USKD: USKD.FEAT_INDEX -5"):
        build_distiller(cfg, 10, 8)


def test_uskd_ignores_a_teacher_with_a_warning():
    with pytest.warns(UserWarning, match="without a teacher"):
        distiller = USKD(resnet8(), resnet8(), cfg_with())
    assert distiller.teacher is None


# --------------------------------------------------------------------------------------------------
# PS-KD


def pskd(epochs=4, num_data=6, num_classes=3, **kwargs):
    cfg = cfg_with("SOLVER.EPOCHS", epochs, "PSKD.ALPHA_T", 0.8)
    return PSKD(resnet8(num_classes), None, cfg, num_data=num_data, num_classes=num_classes, **kwargs)


def test_pskd_alpha_at_the_first_and_last_epoch():
    distiller = pskd(epochs=300)
    assert distiller.alpha(1) == pytest.approx(0.8 / 300)
    assert distiller.alpha(300) == pytest.approx(0.8)


def test_pskd_targets_one_hot_at_epoch_1_then_mixed_with_the_buffer():
    distiller = pskd()
    distiller.predictions[torch.tensor([2, 4])] = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    target, index = torch.tensor([1, 0]), torch.tensor([2, 4])
    before = distiller.predictions.clone()
    torch.testing.assert_close(distiller.soft_targets(target, index, 1), F.one_hot(target, 3).float())
    # epoch 3 of 4: alpha_t = 0.6; (1 - 0.6) onehot + 0.6 * predictions[index]
    expected = torch.tensor([[0.12, 0.7, 0.18], [0.76, 0.18, 0.06]])
    torch.testing.assert_close(distiller.soft_targets(target, index, 3), expected)
    assert torch.equal(distiller.predictions, before)  # soft_targets does not write


def test_pskd_loss_golden_and_the_buffer_written_after_the_targets(monkeypatch):
    distiller = pskd().train()
    distiller.predictions[torch.tensor([2, 4])] = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], requires_grad=True)
    monkeypatch.setattr(distiller.student, "forward", lambda image: (logits, {}))
    _, losses = distiller(image=torch.zeros(2, 3, 32, 32), target=torch.tensor([1, 0]), index=torch.tensor([2, 4]),
                          epoch=3)
    # By hand: -(1/2) sum_n sum_j yhat_{n,j} log softmax(z_n)_j with the epoch-3 targets above.
    assert set(losses) == {"loss_pskd"}
    assert losses["loss_pskd"].item() == pytest.approx(0.8035753653331325, rel=1e-6)
    torch.testing.assert_close(distiller.predictions[torch.tensor([2, 4])], F.softmax(logits.detach(), 1))
    assert distiller.predictions[0].abs().sum() == 0


def test_pskd_buffer_survives_a_save_and_load_but_not_in_the_student(tmp_path):
    from mdistiller_lakd.engine.checkpoint import load_checkpoint, save_checkpoint

    distiller = pskd().train()
    distiller(image=torch.randn(3, 3, 32, 32), target=torch.tensor([0, 1, 2]), index=torch.tensor([5, 0, 3]), epoch=1)
    save_checkpoint({"model": distiller.state_dict()}, str(tmp_path / "latest"))
    restored = pskd()
    restored.load_state_dict(load_checkpoint(str(tmp_path / "latest"))["model"])
    assert torch.equal(restored.predictions, distiller.predictions) and distiller.predictions[5].sum() > 0
    assert "predictions" not in distiller.student.state_dict()
    assert distiller.get_extra_parameters() == 0


@pytest.mark.parametrize(
    "target,index,message",
    [
        (torch.tensor([0, 1]), None, r"PSKD needs each sample's dataset index"),
        (torch.tensor([[0, 1], [1, 0]]), torch.tensor([0, 1]), r"PSKD: targets must be class indices of shape \(N,\)"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), r"PSKD: targets must be class indices"),
        (torch.tensor([0, 1]), torch.tensor([0, 6]), r"sample index 6 is outside .*num_data=6"),
    ],
)
def test_pskd_bad_batches(target, index, message):
    with pytest.raises(ValueError, match=message):
        pskd().train()(image=torch.randn(2, 3, 32, 32), target=target, index=index, epoch=1)


def test_pskd_buffer_width_must_match_the_logits():
    cfg = cfg_with("SOLVER.EPOCHS", 4)
    distiller = PSKD(resnet8(10), None, cfg, num_data=4, num_classes=3).train()
    with pytest.raises(ValueError, match=r"10 logits but the prediction buffer holds 3 classes"):
        distiller(image=torch.randn(2, 3, 32, 32), target=torch.tensor([0, 1]), index=torch.tensor([0, 1]), epoch=1)


@pytest.mark.parametrize("method", ["USKD", "NKD"])
def test_two_dimensional_targets_are_refused(method):
    teacher = resnet8() if method == "NKD" else None
    distiller = distiller_dict[method](resnet8(), teacher, cfg_with()).train()
    with pytest.raises(ValueError, match=rf"{method}: targets must be class indices of shape \(N,\)"):
        distiller(image=torch.randn(2, 3, 32, 32), target=torch.eye(10)[:2], epoch=1)


# --------------------------------------------------------------------------------------------------
# Teacherless building


@pytest.mark.parametrize("method", ["USKD", "PSKD"])
def test_teacherless_methods_build_without_a_teacher_checkpoint(method, tmp_path):
    cfg = cfg_with("DISTILLER.TYPE", method, "DISTILLER.STUDENT", "resnet8",
                   "DISTILLER.TEACHER_CKPT", str(tmp_path / "missing.pth"))
    distiller = build_distiller(cfg, 10, 24)
    assert distiller.teacher is None and not distiller_dict[method].requires_teacher
    if method == "PSKD":
        assert distiller.predictions.shape == (24, 10)  # num_data and num_classes from the dataset


def test_a_method_with_a_teacher_still_needs_its_checkpoint(tmp_path):
    cfg = cfg_with("DISTILLER.TYPE", "NKD", "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
                   "DISTILLER.TEACHER_CKPT", str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_distiller(cfg, 10, 24)


# --------------------------------------------------------------------------------------------------
# Shipped configs

NEW_METHODS = ("nkd", "uskd", "pskd")
SHIPPED = sorted(
    path for method in NEW_METHODS for dataset in ("cifar100", "imagenet")
    for path in glob.glob(os.path.join(REPO_ROOT, "configs", dataset, method, "**", "*.yaml"), recursive=True)
)


def test_the_configs_the_spec_names_are_shipped():
    names = {os.path.relpath(path, os.path.join(REPO_ROOT, "configs")) for path in SHIPPED}
    students = ["resnet20", "resnet32", "resnet8x4", "vgg8", "wrn_16_2", "wrn_40_1"]
    pairs = ["res56_res20", "res110_res32", "res32x4_res8x4", "vgg13_vgg8", "wrn40_2_wrn16_2", "wrn40_2_wrn40_1"]
    assert names == (
        {f"cifar100/nkd/{p}.yaml" for p in pairs} | {f"cifar100/uskd/{s}.yaml" for s in students}
        | {f"cifar100/pskd/{s}.yaml" for s in students} | {f"cifar100/pskd/mdistiller/{s}.yaml" for s in students}
        | {"imagenet/nkd/r34_r18.yaml", "imagenet/uskd/res18.yaml", "imagenet/pskd/res18.yaml"}
    )


def test_config_values_follow_the_references():
    pskd_reference = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", "pskd", "resnet20.yaml")).SOLVER
    assert (pskd_reference.EPOCHS, pskd_reference.LR, pskd_reference.LR_DECAY_STAGES, pskd_reference.BATCH_SIZE,
            pskd_reference.WEIGHT_DECAY, pskd_reference.NESTEROV) == (300, 0.1, [150, 225], 128, 0.0005, True)
    values = {
        "cifar100/nkd/res56_res20.yaml": ("NKD", (3.0, 3.5)), "imagenet/nkd/r34_r18.yaml": ("NKD", (1.0, 1.5)),
        "cifar100/uskd/resnet20.yaml": ("USKD", (0.1, 0.1, 0.1)),
        "imagenet/uskd/res18.yaml": ("USKD", (1.0, 0.1, 0.005)),
        "cifar100/pskd/mdistiller/vgg8.yaml": ("PSKD", (0.8,)), "imagenet/pskd/res18.yaml": ("PSKD", (0.8,)),
    }
    keys = {"NKD": ("TEMPERATURE", "GAMMA"), "USKD": ("ALPHA", "BETA", "MU"), "PSKD": ("ALPHA_T",)}
    for name, (method, expected) in values.items():
        cfg = load_cfg(os.path.join(REPO_ROOT, "configs", name))
        assert cfg.DISTILLER.TYPE == method and tuple(cfg[method][key] for key in keys[method]) == expected, name


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_shipped_config_builds_and_trains_one_step(path):
    cfg = load_cfg(path)
    imagenet = cfg.DATASET.TYPE == "imagenet"
    num_classes, size = (1000, 64) if imagenet else (100, 32)
    build = (lambda name: imagenet_model_dict[name](pretrained=False)) if imagenet else (
        lambda name: cifar_model_dict[name][0](num_classes=num_classes))
    distiller_class = distiller_dict[cfg.DISTILLER.TYPE]
    teacher = build(cfg.DISTILLER.TEACHER).eval() if distiller_class.requires_teacher else None
    extra = {"num_data": 4, "num_classes": num_classes} if distiller_class is PSKD else {}
    distiller = distiller_class(build(cfg.DISTILLER.STUDENT), teacher, cfg, **extra).train()
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=cfg.SOLVER.LR, momentum=0.9)
    _, losses = distiller(image=torch.randn(2, 3, size, size), target=torch.tensor([0, num_classes - 1]),
                          index=torch.tensor([0, 3]), epoch=2)
    expected = {"NKD": {"loss_ce", "loss_nkd"}, "USKD": {"loss_ce", "loss_uskd"}, "PSKD": {"loss_pskd"}}
    assert set(losses) == expected[cfg.DISTILLER.TYPE]
    assert all(torch.isfinite(loss) for loss in losses.values())
    before = [p.detach().clone() for p in distiller.student.parameters()]
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, distiller.student.parameters()))
