"""The baselines run the frozen teacher before the student and keep only what their loss reads.

Each method is checked against the order it had before: the student's forward first, then the
teacher's under ``torch.no_grad()`` with its whole output kept. That reference forward is written
here from the models and the loss functions; losses, the gradient of every learnable parameter and
every buffer (BatchNorm statistics, CRD's memory banks) must be bit-identical.
"""
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

from mdistiller_lakd.distillers._common import batch_statistics
from mdistiller_lakd.distillers.AT import at_loss
from mdistiller_lakd.distillers.DKD import dkd_loss
from mdistiller_lakd.distillers.KD import kd_loss
from mdistiller_lakd.distillers.RKD import rkd_loss
from mdistiller_lakd.lakd.cam import cat_loss
from test_distillers import METHODS, batch, build


def feature_loss(d, data, feats_s, logits_t, feats_t, logits_s):
    """The distillation term of ``d`` as the method computed it before the reorder."""
    method = type(d).__name__
    if method == "KD":
        return d.kd_loss_weight * kd_loss(logits_s, logits_t, d.temperature)
    if method == "AT":
        return d.feat_loss_weight * at_loss(feats_s["feats"][1:], feats_t["feats"][1:], d.p)
    if method == "FitNet":
        hint = d.hint_layer
        return d.feat_loss_weight * F.mse_loss(d.conv_reg(feats_s["feats"][hint]), feats_t["feats"][hint])
    if method == "RKD":
        return d.feat_loss_weight * rkd_loss(
            feats_s["pooled_feat"], feats_t["pooled_feat"], d.squared, d.eps, d.distance_weight, d.angle_weight
        )
    if method == "OFD":
        return d.feat_loss_weight * d.ofd_loss(feats_s["preact_feats"][1:], feats_t["preact_feats"][1:])
    if method == "CRD":
        pooled_s, pooled_t = feats_s["pooled_feat"], feats_t["pooled_feat"]
        return d.feat_loss_weight * d.crd_loss(pooled_s, pooled_t, data["index"], data["contrastive_index"])
    if method == "DKD":
        warmup = min(data["epoch"] / d.warmup, 1.0)
        return warmup * dkd_loss(logits_s, logits_t, data["target"], d.alpha, d.beta, d.temperature)
    raise AssertionError(method)


def student_first(d, data):
    """``(logits, losses)`` of ``d`` in the old order: student, then the whole teacher output.

    The distillation term is built before the cross-entropy, as the distillers build them: where
    both read the logits more than twice (DKD), the autograd engine sums their gradients in the
    order the terms were created, and float addition is not associative.
    """
    image, target = data["image"], data["target"]
    logits_s, feats_s = d.student(image)
    with torch.no_grad(), batch_statistics(d.teacher) if type(d).__name__ == "OFD" else torch.no_grad():
        logits_t, feats_t = d.teacher(image)
    if type(d).__name__ == "CAT_KD":
        cam_s = d.class_maps(d.student, d.student_head)
        with torch.no_grad():
            cam_t = d.class_maps(d.teacher, d.teacher_head, pooled=not d.binarize)
        loss_cat = d.cat_loss_weight * cat_loss(cam_s, cam_t, d.cam_resolution, d.normalize, d.binarize)
        return logits_s, {"loss_CE": d.ce_loss_weight * F.cross_entropy(logits_s, target), "loss_CAT": loss_cat}
    loss_kd = feature_loss(d, data, feats_s, logits_t, feats_t, logits_s)
    return logits_s, {"loss_ce": d.ce_loss_weight * F.cross_entropy(logits_s, target), "loss_kd": loss_kd}


def record_call_order(d) -> list[str]:
    order = []
    for name in ("teacher", "student"):
        getattr(d, name).register_forward_pre_hook(lambda *_, name=name: order.append(name))
    return order


def step(d, forward) -> tuple[torch.Tensor, dict, dict]:
    """Logits, losses and the gradient of each learnable parameter (by name) of one backward."""
    logits, losses = forward(d, batch())
    sum(losses.values()).backward()
    learnable = {id(p) for p in d.get_learnable_parameters()}
    grads = {name: p.grad for name, p in d.named_parameters() if id(p) in learnable}
    assert all(grad is not None for grad in grads.values())
    return logits, losses, grads


# Besides the baselines of test_distillers, CAT-KD's binarised teacher maps (pooled after the threshold).
CASES = [(m, t, s, []) for m, t, s, _ in METHODS] + [
    ("CAT_KD", "wrn_16_1", "resnet8", ["CAT_KD.IF_BINARIZE", True, "CAT_KD.IF_NORMALIZE", True])
]


@pytest.mark.parametrize("method,teacher,student,opts", CASES, ids=[c[0] + "-binarize" * bool(c[3]) for c in CASES])
def test_teacher_first_gives_the_losses_and_gradients_of_the_student_first_order(method, teacher, student, opts):
    distiller, _ = build(method, teacher, student, *opts)
    reference = copy.deepcopy(distiller)
    new_order, old_order = record_call_order(distiller), record_call_order(reference)

    logits, losses, grads = step(distiller, lambda d, data: d(**data))
    ref_logits, ref_losses, ref_grads = step(reference, student_first)

    assert new_order == ["teacher", "student"] and old_order == ["student", "teacher"]
    assert torch.equal(logits, ref_logits)
    assert losses.keys() == ref_losses.keys()
    for key in losses:
        assert torch.equal(losses[key], ref_losses[key]), key
    assert grads.keys() == ref_grads.keys() and len(grads) > len(list(distiller.student.parameters())) - 1
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    ref_buffers = dict(reference.named_buffers())
    for name, buffer in distiller.named_buffers():  # BN statistics, CRD's banks and its Z constants
        assert torch.equal(buffer, ref_buffers[name]), name


def output_names(logits: torch.Tensor, feats: dict) -> dict[str, torch.Tensor]:
    named = {"logits": logits, "pooled_feat": feats["pooled_feat"]}
    for key in ("feats", "preact_feats"):
        named.update({f"{key}[{i}]": f for i, f in enumerate(feats[key])})
    return named


# What each loss reads of the teacher's output (resnet14 / wrn_16_1 / vgg8: a stem and 3 or 4 stages).
KEPT = {
    "KD": {"logits"},
    "DKD": {"logits"},
    "AT": {"feats[1]", "feats[2]", "feats[3]"},
    "FITNET": {"feats[2]"},  # FITNET.HINT_LAYER's default
    "RKD": {"pooled_feat"},
    "CRD": {"pooled_feat"},
    "OFD": {"preact_feats[1]", "preact_feats[2]", "preact_feats[3]"},
    "CAT_KD": set(),  # only the pooled class maps, computed from the recorded head map
}


@pytest.mark.parametrize("method,teacher,student,keys", METHODS, ids=[m[0] for m in METHODS])
def test_only_what_the_loss_reads_of_the_teacher_outlives_its_forward(method, teacher, student, keys):
    distiller, _ = build(method, teacher, student)
    outputs, alive = {}, []

    def watch_teacher(module, inputs, output):
        outputs.update({name: weakref.ref(t) for name, t in output_names(*output).items()})

    def at_student_start(module, inputs):
        alive.append({name for name, ref in outputs.items() if ref() is not None})

    distiller.teacher.register_forward_hook(watch_teacher)
    distiller.student.register_forward_pre_hook(at_student_start)
    distiller(**batch())
    assert len(outputs) > len(KEPT[method]) and alive == [KEPT[method]]
