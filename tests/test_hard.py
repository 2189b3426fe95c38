"""HARD (our variant: no official code exists): the augmentor's bounds and transforms, its objective
raising teacher-student disagreement, gradient routing, state round trips, and a tools/train.py run
with --resume showing the per-epoch grid and scalars."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.analysis.events import read_scalars
from mdistiller_lakd.analysis.runs import parse_worklog
from mdistiller_lakd.augment import LearnedAffineAugmentor
from mdistiller_lakd.distillers import HARD
from mdistiller_lakd.distillers.KD import kd_loss
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint, save_checkpoint
from mdistiller_lakd.engine.trainer import Trainer
from mdistiller_lakd.models import cifar_model_dict
from test_trainer import event_tags

NUM_CLASSES = 10
# The augmentor's learning rate in the behaviour tests: large enough for ten steps to show.
FAST = ["HARD.AUG.LR", "0.1"]
BOUND_KEYS = ["HARD.AUG.LINEAR_MAX", "HARD.AUG.TRANSLATE_MAX", "HARD.AUG.GAIN_MAX", "HARD.AUG.BIAS_MAX"]


def hard_cfg(*opts, prefix: str = "./output"):
    return load_cfg(None, ["DISTILLER.TYPE", "HARD", "LOG.PREFIX", prefix, *opts])


def build(*opts, seed: int = 0) -> HARD:
    """Teacher resnet14, student resnet8 (random weights, seeded), as the behaviour bar asks."""
    torch.manual_seed(seed)
    teacher = cifar_model_dict["resnet14"][0](num_classes=NUM_CLASSES).eval()
    student = cifar_model_dict["resnet8"][0](num_classes=NUM_CLASSES)
    return HARD(student, teacher, hard_cfg(*opts)).train()


def smooth_images(n: int = 8) -> torch.Tensor:
    """Low-frequency images (4x4 noise upsampled), on which spatial transforms change the content."""
    coarse = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def objective_on_fixed_noise(distiller: HARD, image: torch.Tensor) -> tuple[float, float]:
    """(disagreement, teacher shift) of one draw with fixed noise, both models in eval mode."""
    distiller.eval()
    torch.manual_seed(123)
    with torch.no_grad():
        disagreement, shift = distiller.disagreement_and_shift(image)
    distiller.train()
    return disagreement.item(), shift.item()


def augmentor_steps(distiller: HARD, image: torch.Tensor, steps: int = 10) -> None:
    torch.manual_seed(7)
    for _ in range(steps):
        distiller.update_augmentor(image)


# --------------------------------------------------------------------------------------------------
# The augmentor


def test_transform_numbers_map_to_theta_gain_and_bias():
    augmentor = LearnedAffineAugmentor()
    u = torch.arange(1, 13, dtype=torch.float32).view(1, 12) / 100
    params = augmentor.params_of(u)
    assert torch.allclose(params["theta"][0], torch.tensor([[1.01, 0.02, 0.05], [0.03, 1.04, 0.06]]))
    assert torch.allclose(params["gain"][0], torch.tensor([0.07, 0.08, 0.09]))
    assert torch.allclose(params["bias"][0], torch.tensor([0.10, 0.11, 0.12]))
    assert set(LearnedAffineAugmentor("affine").sample(5)) == {"theta"}


def test_translation_and_colour_act_in_normalised_coordinates():
    augmentor = LearnedAffineAugmentor()
    x = torch.randn(2, 3, 32, 32)
    u = torch.zeros(2, 12)
    u[:, 4] = 0.25  # a quarter of the half-width: 4 pixels on 32 x 32
    u[1, 6:9] = torch.tensor([0.1, -0.2, 0.0])
    u[1, 9:12] = torch.tensor([0.05, 0.0, -0.1])
    out = augmentor.apply(x, augmentor.params_of(u))
    assert torch.allclose(out[0, :, :, :28], x[0, :, :, 4:], atol=1e-5)
    assert torch.equal(out[0, :, :, 28:], torch.zeros(3, 32, 4))  # zeros padding
    gain, bias = torch.tensor([1.1, 0.8, 1.0]).view(3, 1, 1), torch.tensor([0.05, 0.0, -0.1]).view(3, 1, 1)
    assert torch.allclose(out[1, :, :, :28], x[1, :, :, 4:] * gain + bias, atol=1e-5)


def test_zero_bounds_give_the_identity():
    distiller = build(*[item for key in BOUND_KEYS for item in (key, "0.0")])
    x = smooth_images()
    assert torch.allclose(distiller.augmentor(x), x, atol=1e-5)
    assert distiller.augmentor.u_abs_mean(distiller.augmentor.draw(16)) == 0.0


@pytest.mark.parametrize("kind, components", [("affine_color", 1), ("affine", 3)])
def test_extreme_parameters_stay_within_the_bounds_and_reach_them(kind, components):
    bounds = {"HARD.AUG.LINEAR_MAX": 0.3, "HARD.AUG.TRANSLATE_MAX": 0.4, "HARD.AUG.GAIN_MAX": 0.15, "HARD.AUG.BIAS_MAX": 0.5}
    distiller = build("HARD.AUG.TYPE", kind, "HARD.AUG.COMPONENTS", components,
                      *[item for pair in bounds.items() for item in pair])
    augmentor = distiller.augmentor
    expected = torch.tensor([0.3] * 4 + [0.4] * 2 + [0.15] * 3 + [0.5] * 3)[: augmentor.mu.shape[1]]
    with torch.no_grad():
        augmentor.mu.copy_(torch.tensor([100.0, -100.0]).repeat(components, 6)[:, : len(expected)])
        augmentor.log_sigma.fill_(-30.0)
        u = augmentor.draw(64)
        assert torch.equal(u.abs(), expected.expand(64, -1))  # reached, exactly
        augmentor.mu.zero_()
        augmentor.log_sigma.fill_(5.0)  # wide noise: saturates, never exceeds
        assert (augmentor.draw(1000).abs() <= expected).all()
    assert augmentor.u_abs_mean(u) == pytest.approx(1.0)


@pytest.mark.parametrize("key, value", [
    ("HARD.AUG.LINEAR_MAX", "1.0"), ("HARD.AUG.TRANSLATE_MAX", "-0.1"), ("HARD.AUG.GAIN_MAX", "-1.0"),
    ("HARD.AUG.TYPE", "vae"), ("HARD.AUG.PADDING", "wrap"), ("HARD.AUG.UPDATE_EVERY", "0"),
    ("HARD.AUG.TEACHER_REG", "-1.0"), ("HARD.AUG.INIT_SIGMA", "0.0"), ("HARD.AUG.COMPONENTS", "0"),
])
def test_bad_values_are_rejected_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build(key, value)


# --------------------------------------------------------------------------------------------------
# The augmentor's objective (bar 05-hard-behaviour (1), (2))


def test_ten_augmentor_steps_raise_disagreement_by_a_fifth():
    distiller, x = build(*FAST), smooth_images()
    before, _ = objective_on_fixed_noise(distiller, x)
    augmentor_steps(distiller, x)
    after, _ = objective_on_fixed_noise(distiller, x)
    assert after >= 1.2 * before, (before, after)


def test_teacher_regulariser_halves_the_teacher_shift():
    x = smooth_images()
    shifts = {}
    for reg in ("0.0", "1000.0"):
        distiller = build("HARD.AUG.TEACHER_REG", reg, *FAST)
        augmentor_steps(distiller, x)
        shifts[reg] = objective_on_fixed_noise(distiller, x)[1]
    assert shifts["1000.0"] <= 0.5 * shifts["0.0"], shifts


def test_update_returns_the_objective_and_touches_the_augmentor_only():
    distiller, x = build(), smooth_images()
    student_state = copy.deepcopy(distiller.student.state_dict())
    distiller.eval()
    torch.manual_seed(5)
    with torch.no_grad():
        disagreement, shift = distiller.disagreement_and_shift(x)
    distiller.train()
    torch.manual_seed(5)
    values = distiller.update_augmentor(x)
    assert values == pytest.approx({"disagreement": disagreement.item(), "teacher_shift": shift.item()})
    assert distiller.student.training and not distiller.teacher.training
    assert all(p.grad is None for p in [*distiller.student.parameters(), *distiller.teacher.parameters()])
    assert all(p.grad is not None for p in distiller.augmentor.parameters())
    # Eval mode during the step: the student's BatchNorm statistics did not move.
    assert all(torch.equal(value, student_state[key]) for key, value in distiller.student.state_dict().items())
