"""ACAM-KD: its losses and fusion against explicit formulas, its masks on every CIFAR family, its
gradient routing (MASK_GRAD), a loss that falls, its config errors and its shipped configs."""
import copy
import glob
import os
import re

import pytest
import torch
import torch.nn as nn

from conftest import REPO_ROOT
from test_baseline_configs import one_step
from mdistiller_lakd.distillers import distiller_dict
from mdistiller_lakd.distillers.ACAM_KD import ACAM_KD
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.lakd.acam import ACAMBlock, dice_diversity, masked_feature_losses
from mdistiller_lakd.models import cifar_model_dict


def model(name, seed):
    torch.manual_seed(seed)
    return cifar_model_dict[name][0](num_classes=100)


def calibrated(net, seed):
    """``net`` with BatchNorm statistics of random images (default statistics let random deep
    features explode), in eval mode."""
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    return net.eval()


def build(teacher="resnet14", student="resnet8", *opts, calibrate=False):
    cfg = load_cfg(None, ["DISTILLER.TYPE", "ACAM_KD", *opts])
    t, s = model(teacher, 0), model(student, 1)
    if calibrate:
        t, s = calibrated(t, 10), calibrated(s, 11)
    return ACAM_KD(s, t, cfg).train()


def batch(size=4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 100, (size,), generator=generator)


# ------------------------------------------------------------------------------------------------
# Formulas


def test_masked_losses_equal_the_explicit_sums():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    spatial, channel = torch.rand(2, 5, 4), torch.rand(2, 5, 3)
    loss_s, loss_c = masked_feature_losses(student, teacher, spatial, channel)
    d = (teacher - student).pow(2).flatten(2)  # (B, C, N)
    expected_s = expected_c = 0.0
    for b in range(2):
        for m in range(5):
            num_s = sum(spatial[b, m, p] ** 2 * d[b, k, p] for k in range(3) for p in range(4))
            num_c = sum(channel[b, m, k] ** 2 * d[b, k, p] for k in range(3) for p in range(4))
            expected_s += num_s / (3 * spatial[b, m].sum()) / 10
            expected_c += num_c / (4 * channel[b, m].sum()) / 10
    assert loss_s.item() == pytest.approx(expected_s.item(), rel=1e-5)
    assert loss_c.item() == pytest.approx(expected_c.item(), rel=1e-5)


def test_masks_of_one_half_give_half_the_mse():
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    half = lambda k: torch.full((2, 6, k), 0.5)  # noqa: E731
    loss_s, loss_c = masked_feature_losses(student, teacher, half(16), half(3))
    mse = (student - teacher).pow(2).mean().item()
    assert loss_s.item() == pytest.approx(mse / 2, rel=1e-5) and loss_c.item() == pytest.approx(mse / 2, rel=1e-5)


def test_dice_is_one_for_identical_masks_zero_for_disjoint_ones_and_the_pair_mean_otherwise():
    same = torch.rand(3, 1, 8).expand(3, 4, 8)
    assert dice_diversity(same).item() == pytest.approx(1.0, rel=1e-6)
    assert dice_diversity(torch.eye(4).unsqueeze(0)).item() == 0.0
    assert dice_diversity(torch.rand(2, 1, 8)).item() == 0.0
    masks = torch.tensor([[[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]])
    # pairs (0,1): 2*1/(2+2); (0,2): 2*2/(2+4); (1,2): 0 -- each counted in both orders
    assert dice_diversity(masks).item() == pytest.approx((0.5 + 2 / 3 + 0.0) / 3, rel=1e-6)


def test_fusion_is_the_softmax_of_teacher_queries_over_student_keys():
    torch.manual_seed(0)
    block = ACAMBlock((8, 3, 3), (8, 3, 3), num_masks=2, qk_ratio=0.5)
    teacher, student = torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3)
    q = block.query.weight.flatten(1) @ teacher.flatten(2)[0]  # (C_q, N)
    k = block.key.weight.flatten(1) @ student.flatten(2)[0]
    v = block.value.weight.flatten(1) @ student.flatten(2)[0]  # (C, N)
    attention = torch.softmax(q.t() @ k / 2.0, dim=1)  # sqrt(C_q) = 2
    expected = (v @ attention.t()).t()  # (N, C): position i = sum_j A[i, j] v_j
    assert block.query.weight.shape == (4, 8, 1, 1)
    torch.testing.assert_close(block.fuse(teacher, student)[0], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Masks, parameters


# (teacher, student, opts, teacher stages, extra parameters): identity f_align where shapes agree,
# LAKD's connector (1x1 conv + BN) for wrn_16_2 -> wrn_16_1 (128 vs 64 channels).
def acam_params(c_t, m, c_s=None):
    connector = c_s * c_t + 2 * c_t if c_s else 0
    return 2 * c_t * (c_t // 2) + c_t * c_t + m * c_t + m + connector


PAIRS = [
    ("resnet14", "resnet8", ["ACAM_KD.NUM_MASKS", 4, "ACAM_KD.STAGES", [-2, -1]], [2, 3],
     acam_params(32, 4) + acam_params(64, 4)),
    ("wrn_16_2", "wrn_16_1", [], [3], acam_params(128, 6, c_s=64)),
    ("vgg11", "vgg8", [], [4], acam_params(512, 6)),
]


@pytest.mark.parametrize("teacher,student,opts,stages,extra", PAIRS, ids=[f"{t}-{s}" for t, s, *_ in PAIRS])
def test_masks_have_the_configured_count_shape_and_range(teacher, student, opts, stages, extra):
    distiller = build(teacher, student, *opts)
    keys = set(model(student, 1).state_dict())
    assert distiller.teacher_stages == stages and distiller.get_extra_parameters() == extra
    assert set(distiller.student.state_dict()) == keys  # the ACAM modules live on the distiller
    assert any(key.startswith("acam.") for key in distiller.state_dict())
    image, _ = batch(2)
    with torch.no_grad():
        teacher_feats = distiller.teacher(image)[1]["feats"]
    masks = distiller.eval().masks(image)
    num_masks = distiller.acam[0].spatial_units.shape[0]
    assert len(masks) == len(stages)
    for stage_masks, stage in zip(masks, stages):
        c, h, w = teacher_feats[stage].shape[1:]
        assert stage_masks["spatial"].shape == (2, num_masks, h, w)
        assert stage_masks["channel"].shape == (2, num_masks, c)
        for mask in stage_masks.values():
            assert mask.min() >= 0 and mask.max() <= 1 and not mask.requires_grad


# ------------------------------------------------------------------------------------------------
# Gradients


def grads(distiller, loss_key):
    """The gradient norm of each group of parameters after back-propagating one loss term."""
    distiller.zero_grad(set_to_none=True)
    image, target = batch()
    _, losses = distiller(image=image, target=target)
    assert set(losses) == {"loss_ce", "loss_acam", "loss_div"}
    losses[loss_key].backward()
    groups = {
        "student": distiller.student.parameters(),
        "teacher": distiller.teacher.parameters(),
        "align": distiller.acam[0].align.parameters(),
        "mask_branch": [p for name, p in distiller.acam.named_parameters() if ".align." not in name],
    }
    return {
        group: sum(0.0 if p.grad is None else p.grad.abs().sum().item() for p in params)
        for group, params in groups.items()
    }


def test_detached_masks_learn_from_diversity_only_and_the_student_from_the_feature_loss_only():
    distiller = build("wrn_16_2", "wrn_16_1", "ACAM_KD.LOSS.CE_WEIGHT", 0.0)
    from_acam, from_div = grads(distiller, "loss_acam"), grads(distiller, "loss_div")
    assert from_acam["student"] > 0 and from_acam["align"] > 0 and from_acam["mask_branch"] == 0
    assert from_div["mask_branch"] > 0 and from_div["student"] == 0 and from_div["align"] == 0
    assert from_acam["teacher"] == from_div["teacher"] == 0


def test_joint_routes_every_term_everywhere_but_the_teacher():
    distiller = build("wrn_16_2", "wrn_16_1", "ACAM_KD.MASK_GRAD", "joint")
    from_acam, from_div = grads(distiller, "loss_acam"), grads(distiller, "loss_div")
    assert min(from_acam["student"], from_acam["align"], from_acam["mask_branch"]) > 0
    assert min(from_div["student"], from_div["align"], from_div["mask_branch"]) > 0
    assert from_acam["teacher"] == from_div["teacher"] == 0


def test_the_total_loss_reaches_every_acam_parameter_and_the_student_not_the_teacher():
    distiller = build("wrn_16_2", "wrn_16_1", "ACAM_KD.LOSS.CE_WEIGHT", 0.0)
    image, target = batch()
    _, losses = distiller(image=image, target=target)
    sum(losses.values()).backward()
    extra = [p for p in distiller.get_learnable_parameters() if all(p is not q for q in distiller.student.parameters())]
    assert sum(p.numel() for p in extra) == distiller.get_extra_parameters()
    assert {id(p) for p in extra} == {id(p) for p in distiller.acam.parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra)
    assert all(p.grad is not None for p in distiller.student.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.parametrize("mode,moved", [("detached", False), ("joint", True)])
def test_the_feature_loss_moves_the_masks_only_when_joint(mode, moved):
    distiller = build("resnet14", "resnet8", "ACAM_KD.MASK_GRAD", mode, calibrate=True).eval()
    image, target = batch()
    before = distiller.masks(image)[0]
    # An SGD step of the ACAM modules on loss_acam alone; eval mode keeps BatchNorm statistics.
    optimizer = torch.optim.SGD(distiller.acam.parameters(), lr=1.0)
    distiller.forward_train(image=image, target=target)[1]["loss_acam"].backward()
    optimizer.step()
    after = distiller.masks(image)[0]
    for key in ("spatial", "channel"):
        assert torch.equal(before[key], after[key]) != moved


def test_the_loss_falls_on_a_fixed_batch_and_the_teacher_stays_bit_identical():
    distiller = build("resnet14", "resnet8", calibrate=True)
    teacher_state = copy.deepcopy(distiller.teacher.state_dict())
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.01, momentum=0.9)
    image, target = batch(8)
    history = []
    for _ in range(8):
        _, losses = distiller(image=image, target=target)
        assert all(torch.isfinite(loss) for loss in losses.values())
        history.append(losses["loss_acam"].item())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert history[-1] < 0.8 * history[0], history
    assert all(torch.equal(v, distiller.teacher.state_dict()[k]) for k, v in teacher_state.items())


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("opts,student,key", [
    (["ACAM_KD.STAGES", [4]], "resnet8", "ACAM_KD.STAGES [4]"),
    (["ACAM_KD.STAGES", []], "resnet8", "ACAM_KD.STAGES []"),
    (["ACAM_KD.TEACHER_STAGES", [1, 2]], "resnet8", "ACAM_KD.TEACHER_STAGES [1, 2]"),
    (["ACAM_KD.TEACHER_STAGES", [7]], "resnet8", "ACAM_KD.TEACHER_STAGES [7]"),
    ([], "MobileNetV2", "ACAM_KD.TEACHER_STAGES: no teacher stage has the size (2, 2)"),
    (["ACAM_KD.NUM_MASKS", 0], "resnet8", "ACAM_KD.NUM_MASKS 0"),
    (["ACAM_KD.QK_RATIO", 1.5], "resnet8", "ACAM_KD.QK_RATIO 1.5"),
    (["ACAM_KD.MASK_GRAD", "frozen"], "resnet8", "ACAM_KD.MASK_GRAD: 'frozen'"),
    (["ACAM_KD.LOSS.DIV_WEIGHT", -1.0], "resnet8", "ACAM_KD.LOSS.DIV_WEIGHT -1.0"),
])
def test_bad_config_is_refused_in_the_constructor_naming_the_key(opts, student, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        build("resnet8", student, *opts)


# ------------------------------------------------------------------------------------------------
# Shipped configs

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*", "acam_kd", "*.yaml")))


def test_the_shipped_configs_are_the_six_cifar_pairs_and_imagenet():
    names = {os.path.relpath(path, os.path.join(REPO_ROOT, "configs")) for path in CONFIGS}
    pairs = ["res56_res20", "res110_res32", "res32x4_res8x4", "wrn40_2_wrn16_2", "wrn40_2_wrn40_1", "vgg13_vgg8"]
    assert names == {f"cifar100/acam_kd/{pair}.yaml" for pair in pairs} | {"imagenet/acam_kd/r34_r18.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: os.path.relpath(path, REPO_ROOT))
def test_config_carries_the_defaults_and_trains_one_step(path):
    cfg = load_cfg(path)
    imagenet = cfg.DATASET.TYPE == "imagenet"
    assert cfg.DISTILLER.TYPE == "ACAM_KD" and distiller_dict["ACAM_KD"] is ACAM_KD
    assert cfg.ACAM_KD.INPUT_SIZE == ((224, 224) if imagenet else (32, 32))
    assert cfg.ACAM_KD == load_cfg(None, ["ACAM_KD.INPUT_SIZE", cfg.ACAM_KD.INPUT_SIZE]).ACAM_KD
    losses = one_step(cfg, 64 if imagenet else 32, 1000 if imagenet else 100)
    assert set(losses) == {"loss_ce", "loss_acam", "loss_div"}


def test_under_bf16_autocast_the_acam_branch_runs_in_float32():
    distiller = build("resnet14", "resnet8", calibrate=True)
    image, target = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, losses = distiller(image=image, target=target)
    assert logits.dtype == torch.bfloat16
    assert losses["loss_acam"].dtype == losses["loss_div"].dtype == torch.float32
    assert all(torch.isfinite(loss) for loss in losses.values())
