"""ReviewKD, VID, PKT, SP, NST and KDSVD: upstream mdistiller's losses, keys and settings checks.

Golden values are worked out by hand on tiny tensors (the arithmetic is in the comments); the
distillers run on small real models.
"""
import copy
import math

import pytest
import torch

from mdistiller_lakd.distillers import distiller_dict
from mdistiller_lakd.distillers.KDSVD import align_signs, kdsvd_loss
from mdistiller_lakd.distillers.NST import nst_loss
from mdistiller_lakd.distillers.PKT import pkt_loss
from mdistiller_lakd.distillers.ReviewKD import hcl_loss
from mdistiller_lakd.distillers.SP import sp_loss
from mdistiller_lakd.distillers.VID import regressor, vid_loss
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.models import cifar_model_dict

# resnet8 and resnet14: stages after the stem 16x32x32, 32x16x16, 64x8x8; pooled feature 64
SMALL_REVIEW = ["REVIEWKD.IN_CHANNELS", "[16, 32, 64, 64]", "REVIEWKD.OUT_CHANNELS", "[16, 32, 64, 64]"]


def build(method, *opts, teacher="resnet14", student="resnet8"):
    cfg = load_cfg(None, ["DISTILLER.TYPE", method, *opts])
    torch.manual_seed(0)
    models = [cifar_model_dict[name][0](num_classes=10) for name in (student, teacher)]
    return distiller_dict[method](*models, cfg).train()


def batch(epoch=30):
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.randn(4, 3, 32, 32, generator=generator), "target": torch.tensor([0, 3, 5, 9]),
            "epoch": epoch}


def test_sp_by_hand():
    # G_s = I; G_t = [[2, 2], [2, 2]] -> rows (1, 1)/sqrt2. Sum of squared differences
    # 2 (1/sqrt2 - 1)^2 + 2 (1/2) = 4 - 2 sqrt2, over N^2 = 4.
    f_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1).requires_grad_()
    f_t = torch.ones(2, 2, 1, 1)
    loss = sp_loss(f_s, f_t)
    assert loss.shape == () and loss.item() == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-6)


def test_pkt_by_hand():
    # Student cosines I -> (I + 1)/2 -> rows (2/3, 1/3); teacher cosines all 1 -> rows (1/2, 1/2).
    # Each row's KL: 1/2 log(3/4) + 1/2 log(3/2) = 1/2 log(9/8); two rows, mean over 4 entries.
    f_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    f_t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert pkt_loss(f_s, f_t).item() == pytest.approx(math.log(9 / 8) / 4, rel=1e-5)


@pytest.mark.parametrize("loss_fn", [pkt_loss, sp_loss], ids=["PKT", "SP"])
def test_similarity_losses_run_in_float32_under_autocast(loss_fn):
    # bf16 similarities put PKT's loss off by orders of magnitude (KL of nearly equal distributions)
    generator = torch.Generator().manual_seed(0)
    f_s, f_t = torch.rand(8, 64, generator=generator), torch.rand(8, 64, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_fn(f_s.bfloat16(), f_t.bfloat16())
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(loss_fn(f_s.bfloat16().float(), f_t.bfloat16().float()).item(), rel=1e-6)


def test_nst_by_hand_with_pooling():
    # Student channel maps (1, 0) and (0, 1); teacher maps (1, 0) and (3, 0), normalised to (1, 0)
    # twice. Kernel means <a_i, b_j>^2 over the 2 x 2 channel pairs: k(t, t) = 1,
    # k(s, s) = (1 + 0 + 0 + 1) / 4, k(s, t) = (1 + 1 + 0 + 0) / 4 -> 1 + 1/2 - 2 (1/2) = 1/2.
    f_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    f_t = torch.tensor([[1.0, 0.0], [3.0, 0.0]]).view(1, 2, 1, 2)
    assert nst_loss([f_s], [f_t]).item() == pytest.approx(0.5, rel=1e-6)
    # a 4x4 student map is average-pooled to the teacher's 2x2 first: constant 2x2 blocks pool to
    # themselves, so the loss is that of the 2x2 map
    small = torch.rand(1, 3, 2, 2)
    big = small.repeat_interleave(2, 2).repeat_interleave(2, 3)
    teacher = torch.rand(1, 3, 2, 2)
    assert nst_loss([big], [teacher]).item() == pytest.approx(nst_loss([small], [teacher]).item(), rel=1e-6)


def test_vid_nll_and_variance_gradient_by_hand():
    # One channel, all regressor weights 1: the mean is relu(relu(x)) = x for x >= 0. With the
    # variance at 5 and a zero teacher: 1/2 (mean(1, 4, 9, 16) / 5 + log 5) = 1/2 (1.5 + log 5).
    # d/d log_scale = 1/2 (-7.5 / 25 + 1 / 5) * sigmoid(log_scale), sigmoid = 1 - exp(-softplus).
    mean_regressor = regressor(1, 1)
    for conv in mean_regressor[::2]:
        torch.nn.init.ones_(conv.weight)
    log_scale = torch.full((1,), math.log(math.exp(5.0 - 1e-5) - 1.0), requires_grad=True)
    f_s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    loss = vid_loss(mean_regressor, log_scale, f_s, torch.zeros(1, 1, 2, 2))
    assert loss.item() == pytest.approx(0.5 * (1.5 + math.log(5.0)), rel=1e-5)
    loss.backward()
    assert log_scale.grad.item() == pytest.approx(-0.05 * (1 - math.exp(-5.0)), rel=1e-4)


def test_hcl_by_hand():
    # A 4x4 map 0..15 against zeros: full MSE mean(i^2) = 77.5; 2x2 pools (2.5, 4.5, 10.5, 12.5)
    # -> 293 / 4 = 73.25; 1x1 pool 7.5 -> 56.25. (77.5 + 73.25 / 2 + 56.25 / 4) / 1.75 = 73.25.
    # A 1x1 pair is its MSE alone; the pairs add up.
    f_s = torch.arange(16.0).view(1, 1, 4, 4)
    assert hcl_loss([f_s], [torch.zeros_like(f_s)]).item() == pytest.approx(73.25)
    point = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)
    assert hcl_loss([f_s, point], [torch.zeros_like(f_s), torch.zeros_like(point)]).item() == pytest.approx(78.25)


def svd_loss_by_hand(relative_sign):
    """kdsvd_loss of the maps below, the teacher's stage-1 vector carrying ``relative_sign`` to its
    stage-0 one (SVD signs are arbitrary; the student's are aligned to the teacher's)."""
    t0, t1 = (0.6, 0.8), (0.0, relative_sign)  # rows (3, 4) and (0, 2), normalised; s = 1 after normalising
    s0, s1 = (0.8, 0.6), (relative_sign / math.sqrt(2),) * 2  # rows (4, 3) and (1, 1)
    rbf = lambda v, u, i, j: math.exp(-((v[i] - u[j]) ** 2) / 8)  # noqa: E731
    return sum((rbf(s1, s0, i, j) - rbf(t1, t0, i, j)) ** 2 for i in range(2) for j in range(2))


def test_kdsvd_by_hand():
    teacher = [torch.tensor([3.0, 4.0]).view(1, 1, 1, 2), torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)]
    student = [torch.tensor([4.0, 3.0]).view(1, 1, 1, 2), torch.tensor([1.0, 1.0]).view(1, 1, 1, 2)]
    signs = [torch.linalg.svd(t.view(1, 2))[2][0].sum().sign().item() for t in teacher]
    expected = svd_loss_by_hand(signs[0] * signs[1])
    assert kdsvd_loss(student, teacher, k=1).item() == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3


def test_kdsvd_alignment_picks_the_best_student_vector_signed_and_passes_gradient_to_it_only():
    # Cosines with the teacher's (0, 1): 0, -1, 0.8 -> the second column, negated.
    v_s = torch.tensor([[1.0, 0.0, 0.6], [0.0, -1.0, 0.8]]).unsqueeze(0).requires_grad_()
    aligned = align_signs(v_s, torch.tensor([[0.0], [1.0]]).unsqueeze(0))
    assert torch.equal(aligned, torch.tensor([[[0.0], [1.0]]]))
    (aligned * torch.tensor([[[2.0], [3.0]]])).sum().backward()
    assert torch.equal(v_s.grad, torch.tensor([[[0.0, -2.0, 0.0], [0.0, -3.0, 0.0]]]))


LOSSES = {
    "PKT": lambda f_s, f_t: pkt_loss(f_s.flatten(1), f_t.flatten(1)),
    "SP": sp_loss,
    "NST": lambda f_s, f_t: nst_loss([f_s], [f_t]),
    "KDSVD": lambda f_s, f_t: kdsvd_loss([f_s, f_s * f_s], [f_t, f_t * f_t], k=1),
    "VID": lambda f_s, f_t: vid_loss(regressor(2, 2), torch.ones(2), f_s, f_t),
}


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_teacher_side_is_a_constant_target(method):
    """A teacher feature that requires grad gets none (it would from every term that reads it,
    without the detach) and the value is the same as for a plain tensor."""
    torch.manual_seed(0)
    f_s, f_t = torch.randn(2, 2, 2, 2, requires_grad=True), torch.randn(2, 2, 2, 2)
    torch.manual_seed(1)
    plain = LOSSES[method](f_s, f_t)
    f_t.requires_grad_()
    torch.manual_seed(1)
    loss = LOSSES[method](f_s, f_t)
    loss.backward()
    assert loss.item() == plain.item()
    assert f_t.grad is None and f_s.grad.abs().sum() > 0


SIX = [
    ("REVIEWKD", SMALL_REVIEW),
    ("VID", []),
    ("PKT", []),
    ("SP", []),
    ("NST", []),
    ("KDSVD", []),
]


@pytest.mark.parametrize("method,opts", SIX, ids=[m for m, _ in SIX])
def test_one_step_trains_the_student_and_extras_and_leaves_the_teacher(method, opts):
    distiller = build(method, *opts)
    for p in distiller.teacher.parameters():
        p.requires_grad_(True)  # a missing no_grad would give them gradients
    teacher_state = copy.deepcopy(distiller.teacher.state_dict())
    student_state = copy.deepcopy(distiller.student.state_dict())
    student_ids = {id(p) for p in distiller.student.parameters()}
    extra = [p for p in distiller.get_learnable_parameters() if id(p) not in student_ids]
    extra_before = [p.detach().clone() for p in extra]
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.01)
    logits, losses = distiller(**batch())
    assert set(losses) == {"loss_ce", "loss_kd"} and logits.shape == (4, 10)
    assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    for key, value in distiller.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key
    assert any(not torch.equal(v, student_state[k]) for k, v in distiller.student.state_dict().items())
    assert all(not torch.equal(p, before) for p, before in zip(extra, extra_before))
    assert distiller.get_extra_parameters() == sum(p.numel() for p in extra)
    assert (len(extra) > 0) == (method in ("REVIEWKD", "VID"))
    distiller.eval()
    image = batch()["image"]
    assert torch.equal(distiller(image=image), distiller.student(image)[0])


def test_extra_modules_carry_upstreams_names():
    review = build("REVIEWKD", *SMALL_REVIEW).state_dict()
    # abfs.0 reads the pooled feature (no fusion), abfs.3 the shallowest stage
    assert review["abfs.0.conv1.0.weight"].shape == (64, 64, 1, 1) and "abfs.0.att_conv.0.weight" not in review
    assert review["abfs.3.conv1.0.weight"].shape == (64, 16, 1, 1)
    assert review["abfs.3.conv2.0.weight"].shape == (16, 64, 3, 3)
    assert review["abfs.3.att_conv.0.weight"].shape == (2, 128, 1, 1)
    vid = build("VID", teacher="wrn_16_2")
    state = vid.state_dict()
    assert [state[f"regressors.{i}.0.weight"].shape for i in range(3)] == [(32, 16, 1, 1), (64, 32, 1, 1), (128, 64, 1, 1)]
    assert state["regressors.2.4.weight"].shape == (128, 128, 1, 1)
    variances = [torch.nn.functional.softplus(state[f"log_scales.{i}"]) + 1e-5 for i in range(3)]
    assert all(torch.allclose(v, torch.full_like(v, 5.0)) for v in variances)


@pytest.mark.parametrize("learn_variance", [False, True])
def test_vid_variance_trains_only_when_asked(learn_variance):
    # False: upstream's fixed variances (outside the optimizer, no gradient); True: the paper's
    vid = build("VID", "VID.LEARN_VARIANCE", learn_variance, teacher="wrn_16_2")
    learnable = {id(p) for p in vid.get_learnable_parameters()}
    assert all((id(p) in learnable) == learn_variance for p in vid.log_scales)
    regressor_count = sum(p.numel() for p in vid.regressors.parameters())
    scale_count = sum(p.numel() for p in vid.log_scales)
    assert vid.get_extra_parameters() == regressor_count + (scale_count if learn_variance else 0)
    _, losses = vid(**batch())
    sum(losses.values()).backward()
    assert all((p.grad is not None) == learn_variance for p in vid.log_scales)


def test_reviewkd_warms_up_over_warmup_epochs():
    distiller = build("REVIEWKD", *SMALL_REVIEW)  # WARMUP_EPOCHS 20
    assert [distiller.warmup_factor(epoch) for epoch in (1, 10, 20, 25)] == [1 / 20, 0.5, 1.0, 1.0]
    # batch statistics only (training mode): the same batch gives the same HCL at every epoch
    _, first_epoch = distiller(**batch(1))
    _, warmed_up = distiller(**batch(25))
    assert first_epoch["loss_kd"].item() == pytest.approx(warmed_up["loss_kd"].item() / 20, rel=1e-5)
    assert first_epoch["loss_ce"].item() == pytest.approx(warmed_up["loss_ce"].item(), rel=1e-6)


@pytest.mark.parametrize("key,value,message", [
    ("REVIEWKD.IN_CHANNELS", "[16, 32, 64, 128]", "REVIEWKD.IN_CHANNELS [16, 32, 64, 128] (shallow to deep) does not fit "
     "the student's features, deepest first: ['64x1x1', '64x8x8', '32x16x16', '16x32x32']"),
    ("REVIEWKD.SHAPES", "[1, 4, 16, 32]", "REVIEWKD.SHAPES [1, 4, 16, 32] (deep to shallow, the first unused) does not fit"),
    ("REVIEWKD.OUT_CHANNELS", "[16, 32, 64, 32]", "REVIEWKD.OUT_CHANNELS [16, 32, 64, 32] (shallow to deep) does not fit "
     "the teacher's targets, shallowest first: ['16x32x32', '32x16x16', '64x8x8', '64x1x1']"),
    ("REVIEWKD.OUT_SHAPES", "[1, 8, 16, 16]", "REVIEWKD.OUT_SHAPES [1, 8, 16, 16] (deep to shallow) does not fit"),
    ("REVIEWKD.SHAPES", "[1, 8, 16]", "REVIEWKD.SHAPES has 3 entries for the 4 of REVIEWKD.IN_CHANNELS"),
    ("REVIEWKD.IN_CHANNELS", "[16, 16, 32, 64, 64, 64]", "REVIEWKD.IN_CHANNELS has 6 entries, more than the student's"),
])
def test_reviewkd_setting_that_does_not_fit_is_named_at_build(key, value, message):
    opts = dict(zip(SMALL_REVIEW[::2], SMALL_REVIEW[1::2]))
    opts[key] = value
    if key == "REVIEWKD.IN_CHANNELS" and value.count(",") == 5:
        opts.update({k: "[1, 2, 3, 4, 5, 6]" for k in ("REVIEWKD.OUT_CHANNELS", "REVIEWKD.SHAPES", "REVIEWKD.OUT_SHAPES")})
    with pytest.raises(ValueError) as error:
        build("REVIEWKD", *[x for kv in opts.items() for x in kv])
    assert message in str(error.value)


def test_reviewkd_config_error_names_the_method_key_and_shapes(tmp_path):
    from mdistiller_lakd.engine.build import make_distiller
    from mdistiller_lakd.engine.cfg import ConfigError

    cfg = load_cfg(None, ["DISTILLER.TYPE", "REVIEWKD"])  # the res32x4 -> res8x4 defaults
    models = [cifar_model_dict[name][0](num_classes=10) for name in ("resnet8", "resnet14")]
    with pytest.raises(ConfigError, match=r"^REVIEWKD: REVIEWKD.IN_CHANNELS \[64, 128, 256, 256\].*'64x1x1', '64x8x8'"):
        make_distiller(cfg, *models, num_data=8, num_classes=10)


def test_reviewkd_max_mid_channel_is_ignored_with_a_warning_as_upstream():
    with pytest.warns(UserWarning, match="REVIEWKD.MAX_MID_CHANNEL 256 is ignored"):
        distiller = build("REVIEWKD", *SMALL_REVIEW, "REVIEWKD.MAX_MID_CHANNEL", 256)
    assert distiller.abfs[0].conv1[0].out_channels == 64  # min(512, IN_CHANNELS[-1])


def test_vid_input_size_the_models_cannot_take_is_named():
    with pytest.raises(ValueError, match=r"VID.INPUT_SIZE \(1, 1\) does not fit the models"):
        build("VID", "VID.INPUT_SIZE", "(1, 1)", teacher="vgg8", student="vgg8")


def test_vid_initial_variance_below_its_floor_is_named():
    with pytest.raises(ValueError, match=r"VID.INIT_PRED_VAR \(1e-06\) must be larger than VID.EPS \(1e-05\)"):
        build("VID", "VID.INIT_PRED_VAR", 1e-6)


def test_reviewkd_warmup_of_zero_epochs_is_a_config_error():
    from mdistiller_lakd.engine.cfg import ConfigError, check_values

    with pytest.raises(ConfigError, match=r"REVIEWKD.WARMUP_EPOCHS: must be > 0, got 0"):
        check_values(load_cfg(None, ["REVIEWKD.WARMUP_EPOCHS", 0]))


def test_kdsvd_stage_widths_that_differ_are_named():
    with pytest.raises(ValueError, match=r"same widths, pair by pair; found \[16, 8, 4, 4\] and \[32, 16, 8\]"):
        build("KDSVD", teacher="resnet14", student="vgg8")
