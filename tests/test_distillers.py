"""The baseline distillers: upstream mdistiller's (and CAT-KD's) losses, keys and training behaviour.

Loss terms are checked against values computed by hand, written independently of the code under
test (loops, explicit formulas); the distillers run on small real models.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import truncnorm

from mdistiller_lakd.distillers import distiller_dict
from mdistiller_lakd.distillers._common import ConvReg
from mdistiller_lakd.distillers.AT import at_loss
from mdistiller_lakd.distillers.CRD import ContrastMemory, contrast_loss
from mdistiller_lakd.distillers.DKD import dkd_loss
from mdistiller_lakd.distillers.KD import kd_loss
from mdistiller_lakd.distillers.OFD import ofd_feat_loss, ofd_margin
from mdistiller_lakd.distillers.RKD import rkd_loss
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.lakd.cam import classifier_of, classifier_weight
from mdistiller_lakd.models import cifar_model_dict
from mdistiller_lakd.models.cifar.wrn import WideResNet

NUM_DATA = 32


def model(name, seed):
    torch.manual_seed(seed)
    return cifar_model_dict[name][0](num_classes=100)


def build(method, teacher="resnet14", student="resnet8", *opts):
    # The CRD dims fit the 64-channel pooled features of resnet8, resnet14 and wrn_16_1.
    crd = ["CRD.NCE.K", 8, "CRD.FEAT.STUDENT_DIM", 64, "CRD.FEAT.TEACHER_DIM", 64]
    cfg = load_cfg(None, ["DISTILLER.TYPE", method, *crd, *opts])
    extra = {"num_data": NUM_DATA} if method == "CRD" else {}
    distiller = distiller_dict[method](model(student, 1), model(teacher, 0), cfg, **extra)
    return distiller.train(), cfg


def batch(size=4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(size, 3, 32, 32, generator=generator),
        "target": torch.randint(0, 100, (size,), generator=generator),
        "index": torch.randperm(NUM_DATA, generator=generator)[:size],
        "contrastive_index": torch.randint(0, NUM_DATA, (size, 9), generator=generator),
        "epoch": 30,
    }


# (method, teacher, student, loss keys): a teacher of another family where connectors are built.
METHODS = [
    ("KD", "resnet14", "resnet8", {"loss_ce", "loss_kd"}),
    ("AT", "resnet14", "resnet8", {"loss_ce", "loss_kd"}),
    ("FITNET", "vgg8", "resnet8", {"loss_ce", "loss_kd"}),
    ("RKD", "resnet14", "resnet8", {"loss_ce", "loss_kd"}),
    ("OFD", "wrn_16_1", "resnet8", {"loss_ce", "loss_kd"}),
    ("CRD", "wrn_16_1", "resnet8", {"loss_ce", "loss_kd"}),
    ("DKD", "resnet14", "resnet8", {"loss_ce", "loss_kd"}),
    ("CAT_KD", "wrn_16_1", "resnet8", {"loss_CE", "loss_CAT"}),
]


@pytest.mark.parametrize("method,teacher,student,keys", METHODS, ids=[m[0] for m in METHODS])
def test_one_step_trains_the_student_and_leaves_the_teacher(method, teacher, student, keys):
    distiller, _ = build(method, teacher, student)
    teacher_state = copy.deepcopy(distiller.teacher.state_dict())
    student_state = copy.deepcopy(distiller.student.state_dict())
    extra = [p for p in distiller.get_learnable_parameters() if all(p is not q for q in distiller.student.parameters())]
    extra_before = [p.detach().clone() for p in extra]
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.01, momentum=0.9)

    logits, losses = distiller(**batch())
    assert set(losses) == keys and logits.shape == (4, 100)
    assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()

    for key, value in distiller.teacher.state_dict().items():  # parameters and BN buffers
        assert torch.equal(value, teacher_state[key]), key
    changed = [k for k, v in distiller.student.state_dict().items() if not torch.equal(v, student_state[k])]
    assert any(k.endswith("weight") for k in changed)
    assert all(not torch.equal(p, before) for p, before in zip(extra, extra_before))
    assert distiller.get_extra_parameters() == sum(p.numel() for p in extra) + (
        sum(b.numel() for b in distiller.contrast.buffers()) if method == "CRD" else 0
    )
    assert not distiller.teacher.training and distiller.student.training
    distiller.eval()
    assert torch.equal(distiller(image=batch()["image"]), distiller.student(batch()["image"])[0])


def test_kd_equals_explicit_kl_times_t_squared():
    logits_s, logits_t = torch.randn(3, 5), torch.randn(3, 5)
    temperature = 4.0
    expected = 0.0
    for row_s, row_t in zip(logits_s.tolist(), logits_t.tolist()):
        z_s = sum(math.exp(v / temperature) for v in row_s)
        z_t = sum(math.exp(v / temperature) for v in row_t)
        for v_s, v_t in zip(row_s, row_t):
            p_s, p_t = math.exp(v_s / temperature) / z_s, math.exp(v_t / temperature) / z_t
            expected += p_t * math.log(p_t / p_s)
    expected = expected / 3 * temperature**2
    assert kd_loss(logits_s, logits_t, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_kd_distiller_weights_its_terms():
    distiller, cfg = build("KD", "resnet14", "resnet8", "KD.TEMPERATURE", 2, "KD.LOSS.KD_WEIGHT", 0.3)
    data = batch()
    logits_s, losses = distiller(**data)
    with torch.no_grad():
        logits_t = distiller.teacher(data["image"])[0]
    assert torch.allclose(losses["loss_kd"], 0.3 * kd_loss(logits_s, logits_t, 2.0))
    assert torch.allclose(losses["loss_ce"], 0.1 * F.cross_entropy(logits_s, data["target"]))


def explicit_attention(feature, size):
    """mean_c f^2 after pooling to ``size``, flattened and divided by its L2 norm, per sample."""
    pooled = F.adaptive_avg_pool2d(feature, size)
    maps = [(sample**2).mean(0).flatten() for sample in pooled]
    return [m / math.sqrt(float((m**2).sum())) for m in maps]


def test_at_equals_the_explicit_attention_formula_with_pooling():
    pairs = [(torch.randn(2, 3, 8, 8), torch.randn(2, 6, 4, 4)), (torch.randn(2, 4, 4, 4), torch.randn(2, 5, 4, 4))]
    expected = 0.0
    for f_s, f_t in pairs:
        size = min(f_s.shape[2], f_t.shape[2])
        a_s, a_t = explicit_attention(f_s, size), explicit_attention(f_t, size)
        expected += sum(float(((s - t) ** 2).sum()) for s, t in zip(a_s, a_t)) / (2 * size * size)
    loss = at_loss([p[0] for p in pairs], [p[1] for p in pairs], 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_at_distiller_uses_every_stage_after_the_stem():
    distiller, _ = build("AT")
    data = batch()
    _, losses = distiller(**data)
    with torch.no_grad():
        f_s = distiller.student(data["image"])[1]["feats"]
        f_t = distiller.teacher(data["image"])[1]["feats"]
    assert torch.allclose(losses["loss_kd"], 1000.0 * at_loss(f_s[1:], f_t[1:], 2))


def smooth_l1(a, b):
    diffs = [abs(x - y) for x, y in zip(a, b)]
    return sum(0.5 * d * d if d < 1 else d - 0.5 for d in diffs) / len(diffs)


def explicit_rkd(points_s, points_t):
    def distances(points):
        n = len(points)
        d = [[math.dist(points[i], points[j]) for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [d[i][j] / mean for i in range(n) for j in range(n)]

    def angles(points):
        n, out = len(points), []
        for a in range(n):
            for b in range(n):
                for c in range(n):
                    u = [x - y for x, y in zip(points[b], points[a])]
                    v = [x - y for x, y in zip(points[c], points[a])]
                    nu, nv = math.hypot(*u), math.hypot(*v)
                    out.append(0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / nu / nv)
        return out

    return 25 * smooth_l1(distances(points_s), distances(points_t)) + 50 * smooth_l1(angles(points_s), angles(points_t))


def test_rkd_equals_explicit_distance_and_angle_terms():
    f_s, f_t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    expected = explicit_rkd(f_s.tolist(), f_t.tolist())
    assert rkd_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-9)


def test_dkd_equals_the_target_and_non_target_split_by_hand():
    logits_s, logits_t = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    target = torch.tensor([0, 4, 2])
    alpha, beta, temperature = 1.5, 8.0, 4.0
    tckd = nckd = 0.0
    for row_s, row_t, gt in zip(logits_s, logits_t, target.tolist()):
        p_s, p_t = F.softmax(row_s / temperature, 0), F.softmax(row_t / temperature, 0)
        b_s, b_t = [p_s[gt], 1 - p_s[gt]], [p_t[gt], 1 - p_t[gt]]
        tckd += sum(float(t * math.log(t / s)) for s, t in zip(b_s, b_t))
        others = [c for c in range(6) if c != gt]  # the non-target classes alone
        q_s, q_t = F.softmax(row_s[others] / temperature, 0), F.softmax(row_t[others] / temperature, 0)
        nckd += float((q_t * (q_t / q_s).log()).sum())
    expected = (alpha * tckd + beta * nckd) * temperature**2 / 3
    assert dkd_loss(logits_s, logits_t, target, alpha, beta, temperature).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("epoch,factor", [(1, 0.05), (10, 0.5), (20, 1.0), (200, 1.0)])
def test_dkd_warms_up_linearly(epoch, factor):
    distiller, _ = build("DKD")
    data = dict(batch(), epoch=epoch)
    logits_s, losses = distiller(**data)
    with torch.no_grad():
        logits_t = distiller.teacher(data["image"])[0]
    expected = factor * dkd_loss(logits_s, logits_t, data["target"], 1.0, 8.0, 4.0)
    assert torch.allclose(losses["loss_kd"], expected)


@pytest.mark.parametrize(
    "s_size,t_size,kind", [(16, 8, nn.Conv2d), (8, 16, nn.ConvTranspose2d), (8, 8, nn.Conv2d), (8, 6, nn.Conv2d)]
)
def test_fitnet_regressor_maps_the_student_onto_the_teacher_shape(s_size, t_size, kind):
    regressor = ConvReg((1, 3, s_size, s_size), (1, 7, t_size, t_size))
    assert type(regressor.conv) is kind
    assert regressor(torch.randn(2, 3, s_size, s_size)).shape == (2, 7, t_size, t_size)


def test_fitnet_regressor_rejects_a_smaller_student_map():
    with pytest.raises(ValueError, match="student feature of size 4x4.*teacher feature of size 16x16"):
        ConvReg((1, 3, 4, 4), (1, 7, 16, 16))


def test_fitnet_is_the_mse_after_the_regressor():
    distiller, _ = build("FITNET", "vgg8", "resnet8")  # hint 2: resnet8 32x16x16 -> vgg8 256x8x8
    assert distiller.conv_reg.conv.stride == (2, 2) and distiller.conv_reg.conv.out_channels == 256
    data = batch()
    _, losses = distiller(**data)
    with torch.no_grad():
        hint_s = distiller.student(data["image"])[1]["feats"][2]
        hint_t = distiller.teacher(data["image"])[1]["feats"][2]
        regressed = F.relu(distiller.conv_reg.bn(distiller.conv_reg.conv(hint_s)))
    assert torch.allclose(losses["loss_kd"], 100.0 * ((regressed - hint_t) ** 2).mean(), rtol=1e-4)


def test_fitnet_out_of_range_hint_layer_is_named():
    with pytest.raises(ValueError, match="FITNET.HINT_LAYER 7"):
        build("FITNET", "resnet14", "resnet8", "FITNET.HINT_LAYER", 7)


def test_ofd_margin_is_the_truncated_gaussian_mean_or_minus_three_sigma():
    bn = nn.BatchNorm2d(3)
    bn.weight.data = torch.tensor([1.0, -2.0, 0.5])
    bn.bias.data = torch.tensor([0.3, -1.0, 2.0])  # channel 2: P(x < 0) = Phi(-4) < 0.001
    expected = [truncnorm.mean(-math.inf, -m / abs(s), loc=m, scale=abs(s)) for s, m in [(1.0, 0.3), (-2.0, -1.0)]]
    margin = ofd_margin(bn).flatten().tolist()
    assert margin[:2] == pytest.approx(expected, rel=1e-5)
    assert margin[2] == pytest.approx(-1.5)


def explicit_ofd(source, target, margin):
    total = 0.0
    for s_sample, t_sample in zip(source, target):
        for c, (s_channel, t_channel) in enumerate(zip(s_sample, t_sample)):
            m = float(margin.flatten()[c])
            for s, t in zip(s_channel.flatten().tolist(), t_channel.flatten().tolist()):
                if t > 0 or (m < t and s > t):
                    total += (s - t) ** 2
                elif t <= m and s > m:
                    total += (s - m) ** 2
    return total / len(source)


def test_ofd_feat_loss_is_the_margin_masked_l2():
    source, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    margin = torch.tensor([-0.5, -1.0, -0.2]).view(1, 3, 1, 1)
    assert ofd_feat_loss(source, target, margin).item() == pytest.approx(explicit_ofd(source, target, margin), rel=1e-5)


def test_ofd_distills_connected_preact_stages_against_the_teacher_on_batch_statistics():
    distiller, _ = build("OFD", "wrn_16_1", "resnet8")
    data = batch()
    teacher_in_train_mode = copy.deepcopy(distiller.teacher).train()  # upstream's teacher mode
    _, losses = distiller(**data)
    with torch.no_grad():
        f_s = distiller.student(data["image"])[1]["preact_feats"][1:]
        f_t = teacher_in_train_mode(data["image"])[1]["preact_feats"][1:]
        bns = distiller.teacher.get_bn_before_relu()
        expected = 0.0
        for i, (s, t, bn) in enumerate(zip(f_s, f_t, bns)):
            s = distiller.connectors.connectors[i](s)
            t = F.adaptive_avg_pool2d(t, s.shape[-2:])
            expected += explicit_ofd(s, t, ofd_margin(bn)) / 2 ** (2 - i)
    assert losses["loss_kd"].item() == pytest.approx(0.001 * expected, rel=1e-4)
    conv = distiller.connectors.connectors[0][0]
    assert conv.bias is None and conv.kernel_size == (1, 1) and (conv.in_channels, conv.out_channels) == (16, 16)
    assert not any("margin" in key for key in distiller.state_dict())


def test_nce_loss_by_hand():
    scores = torch.rand(3, 5, dtype=torch.float64) * 0.01
    noise = 4 / 100
    expected = 0.0
    for row in scores.tolist():
        expected += math.log(row[0] / (row[0] + noise + 1e-7))
        expected += sum(math.log(noise / (v + noise + 1e-7)) for v in row[1:])
    assert contrast_loss(scores, 100).item() == pytest.approx(-expected / 3, rel=1e-9)


def test_contrast_memory_scores_then_momentum_updates_its_banks():
    memory = ContrastMemory(feat_dim=4, num_data=10, k=3, temperature=0.5, momentum=0.5)
    bank_s, bank_t = memory.memory_v1.clone(), memory.memory_v2.clone()
    v_s, v_t = F.normalize(torch.randn(2, 4)), F.normalize(torch.randn(2, 4))
    y, idx = torch.tensor([3, 7]), torch.tensor([[3, 0, 1, 2], [7, 4, 5, 6]])
    out_s, out_t = memory(v_s, v_t, y, idx)
    raw_s = torch.exp(torch.einsum("nkd,nd->nk", bank_t[idx], v_s) / 0.5)  # student vs teacher bank
    raw_t = torch.exp(torch.einsum("nkd,nd->nk", bank_s[idx], v_t) / 0.5)
    z_s, z_t = raw_s.mean() * 10, raw_t.mean() * 10
    assert torch.allclose(out_s, raw_s / z_s) and torch.allclose(out_t, raw_t / z_t)
    assert torch.allclose(memory.memory_v1[y], F.normalize(0.5 * bank_s[y] + 0.5 * v_s))
    assert torch.allclose(memory.memory_v2[y], F.normalize(0.5 * bank_t[y] + 0.5 * v_t))
    untouched = [i for i in range(10) if i not in (3, 7)]
    assert torch.equal(memory.memory_v1[untouched], bank_s[untouched])
    memory(v_s, v_t, y, idx)  # the normalisation constants are fixed by the first batch
    assert torch.allclose(memory.params[2:4], torch.stack([z_s, z_t]))


def test_crd_memory_banks_are_buffers_in_the_state_dict():
    distiller, _ = build("CRD", "wrn_16_1", "resnet8")
    buffers = dict(distiller.named_buffers())
    assert buffers["contrast.memory_v1"].shape == (NUM_DATA, 128)
    assert {"contrast.params", "contrast.memory_v2"} <= set(distiller.state_dict())
    assert all(not name.startswith("contrast") for name, _ in distiller.named_parameters())
    expected_extra = (64 * 128 + 128) * 2 + 2 * NUM_DATA * 128 + 5
    assert distiller.get_extra_parameters() == expected_extra


def test_crd_wrong_feature_dim_names_the_key():
    distiller, _ = build("CRD", "wrn_16_1", "resnet8", "CRD.FEAT.TEACHER_DIM", 256)
    with pytest.raises(ValueError, match="CRD.FEAT.TEACHER_DIM is 256 .* 64 channels"):
        distiller(**batch())


# CAT-KD's "_test" models apply a bias-free 1x1 convolution holding the classifier weight to the map
# below; these read that map independently of the hook, per family (its resnet.py, wrn.py, vgg.py).
def cat_kd_test_map(model, image):
    feats = model(image)[1]["feats"]
    if isinstance(model, WideResNet):  # the final BN + ReLU
        return model.relu(model.bn1(feats[-1]))
    return feats[-1]  # ResNet: layer3's output; VGG: block4's, after its ReLU


def cat_kd_test_head(model):
    weight = classifier_weight(model)
    conv_test = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1, bias=False)
    conv_test.weight.data.copy_(weight.data.view(*weight.shape, 1, 1))
    return conv_test


@pytest.mark.parametrize("teacher,student", [("wrn_16_1", "resnet8"), ("resnet14", "vgg8")])
def test_cat_kd_equals_the_loss_of_1x1_conv_heads(teacher, student):
    distiller, _ = build(
        "CAT_KD", teacher, student, "CAT_KD.LOSS.CAT_loss_weight", 3.0, "CAT_KD.IF_NORMALIZE", False
    )
    data = batch()
    _, losses = distiller(**data)
    with torch.no_grad():
        maps = [cat_kd_test_map(m, data["image"]) for m in (distiller.student, distiller.teacher)]
        cams = [cat_kd_test_head(m)(x) for m, x in zip((distiller.student, distiller.teacher), maps)]
    pooled = [F.adaptive_avg_pool2d(c, 2) for c in cams]
    assert torch.allclose(losses["loss_CAT"], 3.0 * F.mse_loss(*pooled), rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8"])
def test_class_maps_are_the_1x1_convolution_of_the_pooled_map(name):
    distiller, _ = build("CAT_KD", name, name)
    net, hook = distiller.student, distiller.student_head
    image = batch()["image"]
    logits, _ = net(image)
    head_map = hook.map
    cams = distiller.class_maps(net, hook, pooled=False)
    weight = classifier_weight(net)
    assert torch.allclose(cams, F.conv2d(head_map, weight[:, :, None, None]), atol=1e-5)
    # Averaging the maps gives the logits less the bias: the map is the one the classifier pools.
    assert torch.allclose(cams.mean(dim=(2, 3)), logits - classifier_of(net).bias, atol=1e-4)
    assert hook.map is None
    # By default the maps come pooled to CAM_RESOLUTION (2), computed from the pooled map.
    net(image)
    pooled = distiller.class_maps(net, hook)
    assert pooled.shape == (len(image), cams.shape[1], 2, 2)
    assert torch.allclose(pooled, F.adaptive_avg_pool2d(cams, 2), atol=1e-5)


def test_cat_kd_only_cat_drops_the_cross_entropy_and_gradients_reach_the_classifier():
    distiller, _ = build("CAT_KD", "resnet14", "resnet8", "CAT_KD.onlyCAT", True)
    _, losses = distiller(**batch())
    assert set(losses) == {"loss_CAT"}
    losses["loss_CAT"].backward()
    assert distiller.student.fc.weight.grad.abs().sum() > 0 and distiller.student.fc.bias.grad is None


@pytest.mark.parametrize("normalize,binarize", [(True, False), (False, True)])
def test_cat_kd_normalize_and_binarize_follow_cat_kd(normalize, binarize):
    distiller, _ = build(
        "CAT_KD", "resnet14", "resnet8", "CAT_KD.IF_NORMALIZE", normalize, "CAT_KD.IF_BINARIZE", binarize
    )
    data = batch()
    _, losses = distiller(**data)
    with torch.no_grad():
        cam_s, cam_t = [cat_kd_test_head(m)(cat_kd_test_map(m, data["image"])) for m in (distiller.student, distiller.teacher)]
    if binarize:  # CAT-KD: 1 where the teacher map exceeds its mean absolute value
        cam_t = (cam_t > cam_t.abs().mean(dim=(2, 3), keepdim=True)).float()
    pooled = [F.adaptive_avg_pool2d(c, 2).flatten(2) for c in (cam_s, cam_t)]
    if normalize:
        pooled = [p / p.norm(dim=2, keepdim=True) for p in pooled]
    assert torch.allclose(losses["loss_CAT"], 400.0 * F.mse_loss(*pooled), rtol=1e-4)


def test_cat_kd_partial_cams_experiment_is_refused_by_name():
    with pytest.raises(ValueError, match="CAT_KD.IF_OnlyTransferPartialCAMs"):
        build("CAT_KD", "resnet14", "resnet8", "CAT_KD.IF_OnlyTransferPartialCAMs", True)
