"""HARD (our variant: no official code exists): the augmentor's bounds and transforms, its objective
raising teacher-student disagreement, gradient routing, state round trips, and a tools/train.py run
with --resume showing the per-epoch grid and scalars."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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
from test_baseline_configs import PAIRS, read
from test_distributed import free_port
from test_trainer import KILL_MID_EPOCH, event_tags

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
    mu_before = distiller.augmentor.mu.detach().clone()
    torch.manual_seed(5)
    values = distiller.update_augmentor(x)
    assert values == pytest.approx({"disagreement": disagreement.item(), "teacher_shift": shift.item()})
    assert distiller.student.training and not distiller.teacher.training
    assert all(p.grad is None for p in [*distiller.student.parameters(), *distiller.teacher.parameters()])
    assert not torch.equal(distiller.augmentor.mu, mu_before)  # the step was taken ...
    assert all(p.grad is None for p in distiller.augmentor.parameters())  # ... and its gradients freed
    # Eval mode during the step: the student's BatchNorm statistics did not move.
    assert all(torch.equal(value, student_state[key]) for key, value in distiller.student.state_dict().items())


# --------------------------------------------------------------------------------------------------
# The student step, the schedule and state (bar 05-hard-behaviour (4) - (7))


def test_forward_train_losses_and_their_gradients_reach_the_student_only():
    # Zero bounds: the augmented half equals the clean half, so each KD term is the plain KD loss.
    distiller = build(*[item for key in BOUND_KEYS for item in (key, "0.0")])
    x, y = smooth_images(4), torch.arange(4)
    logits, losses = distiller(image=x, target=y, epoch=1)
    assert list(losses) == ["loss_ce", "loss_kd", "loss_kd_aug"] and logits.shape == (4, NUM_CLASSES)
    assert all(p.grad is None for p in distiller.student.parameters())  # the augmentor step left it alone
    assert all(p.grad is None for p in distiller.augmentor.parameters())  # its own step freed its gradients
    reference = copy.deepcopy(distiller.student)  # train mode: batch statistics, as in the step
    with torch.no_grad():
        expected_kd = kd_loss(reference(x)[0], distiller.teacher(x)[0], 4.0)
    assert losses["loss_kd"].item() == pytest.approx(0.9 * expected_kd.item(), rel=1e-4)
    assert losses["loss_kd_aug"].item() == pytest.approx(losses["loss_kd"].item(), rel=1e-4)
    assert losses["loss_ce"].item() == pytest.approx(0.1 * F.cross_entropy(logits, y).item(), rel=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.student.parameters())
    assert all(p.grad is None for p in [*distiller.augmentor.parameters(), *distiller.teacher.parameters()])


def test_augmentor_steps_every_update_every_student_steps():
    distiller, x, y = build("HARD.AUG.UPDATE_EVERY", "2"), smooth_images(4), torch.arange(4)
    changed = []
    for _ in range(4):
        mu = distiller.augmentor.mu.detach().clone()
        distiller(image=x, target=y, epoch=1)
        changed.append(not torch.equal(mu, distiller.augmentor.mu))
    assert changed == [True, False, True, False] and distiller.step_count.item() == 4
    metrics = distiller.epoch_metrics()
    assert set(metrics) == {"hard/disagreement", "hard/teacher_shift", "hard/sigma_mean", "hard/u_abs_mean"}
    assert metrics["hard/disagreement"] > 0 and 0 < metrics["hard/u_abs_mean"] < 1
    assert distiller.epoch_metrics()["hard/disagreement"] == 0.0  # reset by the call


def test_trainer_steps_leave_the_teacher_untouched_and_state_round_trips(tmp_path):
    distiller = build()
    teacher_state = copy.deepcopy(distiller.teacher.state_dict())
    student_state = copy.deepcopy(distiller.student.state_dict())
    mu = distiller.augmentor.mu.detach().clone()
    images, targets = smooth_images(8), torch.arange(8) % NUM_CLASSES
    data = DataLoader(TensorDataset(images, targets, torch.arange(8)), batch_size=4)
    trainer = Trainer("hard", distiller, data, data, hard_cfg(prefix=str(tmp_path)), torch.device("cpu"))
    for step, batch in enumerate(data):
        trainer.train_step(batch, epoch=1, iteration=step)
    teacher = distiller.teacher
    assert all(torch.equal(value, teacher_state[key]) for key, value in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert not learnable & {id(p) for p in [*teacher.parameters(), *distiller.augmentor.parameters()]}
    assert not torch.equal(mu, distiller.augmentor.mu)
    assert not torch.equal(student_state["conv1.weight"], distiller.student.state_dict()["conv1.weight"])

    # The student's state_dict is the architecture's; the augmentor, its Adam and the step counter
    # live in the distiller's and survive a weights_only load.
    assert set(distiller.student.state_dict()) == set(cifar_model_dict["resnet8"][0]().state_dict())
    state = distiller.state_dict()
    assert {"augmentor.mu", "augmentor.log_sigma", "step_count", "_extra_state"} <= set(state)
    save_checkpoint({"model": state}, str(tmp_path / "latest"))
    restored = build(seed=1)
    restored.load_state_dict(load_checkpoint(str(tmp_path / "latest"))["model"])
    assert restored.step_count.item() == 2
    for a, b in ((distiller, restored),):
        assert all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items()
                   if key != "_extra_state")
    # Same Adam moments: the next step is the same on both.
    for model in (distiller, restored):
        torch.manual_seed(3)
        model.update_augmentor(images[:4])
    assert torch.equal(distiller.augmentor.mu, restored.augmentor.mu)
    assert torch.equal(distiller.augmentor.log_sigma, restored.augmentor.log_sigma)


def test_visualize_returns_the_clean_and_an_augmented_batch():
    distiller, x = build(), smooth_images(4)
    clean, augmented = distiller.visualize(x)
    assert clean is x and augmented.shape == x.shape and not augmented.requires_grad
    assert not torch.allclose(clean, augmented)
    (grid,) = distiller.epoch_images(x)
    assert (grid.folder, grid.tag, grid.rows.shape) == ("hard_aug", "hard/augmented", (2, 4, 3, 32, 32))


# --------------------------------------------------------------------------------------------------
# tools/train.py: grids, scalars, --resume


def train(folder: str, resume: bool = False, patch: str = "") -> subprocess.CompletedProcess:
    """tools/train.py on the shipped res56_res20 config shrunk by overrides (resnet8 both sides)."""
    overrides = [
        "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
        "DISTILLER.TEACHER_CKPT", os.path.join(folder, "teacher.pth"), "EXPERIMENT.NAME", "hard",
        "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "16", "DATASET.TEST.BATCH_SIZE", "16",
        "LOG.SAVE_CHECKPOINT_FREQ", "1", "DATASET.ROOT", os.path.join(folder, "data"),
        "DATASET.DOWNLOAD", "False", "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", os.path.join(folder, "out"),
    ]
    config = os.path.join("configs", "cifar100", "hard", "res56_res20.yaml")
    launcher = ["tools/train.py"]
    if patch:
        launcher = ["-c", patch + "\nimport runpy\nrunpy.run_path('tools/train.py', run_name='__main__')"]
    args = [*launcher, "--cfg", config, *(["--resume"] if resume else []), *overrides]
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_train_shows_grids_and_scalars_and_resumes_to_the_uninterrupted_run(tmp_path):
    runs = {}
    for name in ("straight", "resumed"):
        folder = str(tmp_path / name)
        write_cifar(os.path.join(folder, "data"), "cifar100", num_train=32, num_test=20)
        torch.manual_seed(1)  # not the student's initial weights (seed 0)
        save_checkpoint({"model": cifar_model_dict["resnet8"][0](num_classes=100).state_dict()},
                        os.path.join(folder, "teacher.pth"))
        if name == "resumed":  # killed in the middle of epoch 2, then resumed from epoch 1's `latest`
            assert train(folder, patch=KILL_MID_EPOCH).returncode == -9
        result = train(folder, resume=name == "resumed")
        assert result.returncode == 0, result.stderr[-3000:]
        # The folder name holds the overrides: find it by its worklog.
        (runs[name],) = [root for root, _, files in os.walk(os.path.join(folder, "out")) if "worklog.txt" in files]
    run_dir = runs["resumed"]
    # 16 validation images (VIS_NUM) above their augmentations: 2 rows of 16 tiles of 32 + 2 pixels.
    for epoch in (1, 2):
        with Image.open(os.path.join(run_dir, "hard_aug", f"epoch_{epoch}.png")) as picture:
            assert picture.size == (16 * 34 + 2, 2 * 34 + 2)
    with open(os.path.join(run_dir, "worklog.txt")) as f:
        worklog = f.read()
    epochs, _ = parse_worklog(worklog)
    keys = ["hard/disagreement", "hard/teacher_shift", "hard/sigma_mean", "hard/u_abs_mean"]
    assert list(epochs) == [1, 2] and all(key in block for block in epochs.values() for key in keys), epochs
    assert all(epochs[e]["hard/disagreement"] > 0 for e in epochs), worklog
    # Tensorboard: from the uninterrupted run (a SIGKILL may cut the last records of an event file).
    events = os.path.join(runs["straight"], "train.events")
    scalars = read_scalars(events)
    assert all(len(scalars[key]) == 2 for key in keys + ["train_losses/loss_kd_aug"])
    assert "hard/augmented" in event_tags(events)
    # Resumed from `latest` (augmentor, its Adam, the step counter, RNG): the uninterrupted result.
    got, expected = (load_checkpoint(os.path.join(runs[n], "latest"))["model"] for n in ("resumed", "straight"))
    assert got["step_count"].item() == 4
    assert all(torch.equal(got[key], expected[key]) for key in expected if key != "_extra_state")


# --------------------------------------------------------------------------------------------------
# Two gloo ranks: the augmentor stays trainable, outside DDP, and identical on every rank


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        distiller = build(seed=rank)  # different initial weights: the trainer starts all from rank 0's
        images = smooth_images(8)
        data = DataLoader(TensorDataset(images, torch.arange(8), torch.arange(8)), batch_size=8)
        trainer = Trainer("hard", distiller, data, data, hard_cfg("SOLVER.BATCH_SIZE", "8", prefix=out_dir),
                          torch.device("cpu"))
        torch.manual_seed(rank)  # each rank draws its own augmentations
        for step in range(2):
            share = slice(4 * rank, 4 * rank + 4)
            trainer.train_step((images[share], torch.arange(8)[share], torch.arange(4)), epoch=1, iteration=step)
        torch.save({
            "synced_locally": trainer.model is distiller,
            "trainable": [p.requires_grad for p in distiller.augmentor.parameters()],
            "state": distiller.state_dict(),
        }, os.path.join(out_dir, f"rank_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_one_augmentor(tmp_path):
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(str(tmp_path / f"rank_{r}.pt"), weights_only=True) for r in range(2)]
    assert all(r["synced_locally"] and r["trainable"] == [True, True] for r in ranks)
    state_0, state_1 = ranks[0]["state"], ranks[1]["state"]
    assert not torch.equal(state_0["augmentor.mu"], torch.zeros_like(state_0["augmentor.mu"]))
    assert [key for key in state_0 if key != "_extra_state" and not torch.equal(state_0[key], state_1[key])] == []


# --------------------------------------------------------------------------------------------------
# Config node and shipped configs

NODE_DEFAULTS = {
    "TEMPERATURE": 4.0, "LOSS.CE_WEIGHT": 0.1, "LOSS.KD_WEIGHT": 0.9, "LOSS.AUG_KD_WEIGHT": 0.9,
    "AUG.TYPE": "affine_color", "AUG.COMPONENTS": 1, "AUG.TRANSLATE_MAX": 0.25, "AUG.LINEAR_MAX": 0.25,
    "AUG.GAIN_MAX": 0.2, "AUG.BIAS_MAX": 0.2, "AUG.INIT_SIGMA": 0.1, "AUG.PADDING": "zeros", "AUG.LR": 0.001,
    "AUG.UPDATE_EVERY": 1, "AUG.TEACHER_REG": 1.0, "AUG.VIS_NUM": 16,
}


def node_values(cfg) -> dict:
    return {key: read(cfg.HARD, key) for key in NODE_DEFAULTS}


def test_node_defaults_and_the_shipped_configs():
    assert node_values(load_cfg()) == NODE_DEFAULTS
    for pair, models in PAIRS.items():
        cfg = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", "hard", f"{pair}.yaml"))
        assert (cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == ("HARD", *models)
        solver = cfg.SOLVER
        assert (solver.EPOCHS, solver.LR, solver.LR_DECAY_STAGES, solver.BATCH_SIZE) == (240, 0.05, [150, 180, 210], 64)
        assert node_values(cfg) == NODE_DEFAULTS
    cfg = load_cfg(os.path.join(REPO_ROOT, "configs", "imagenet", "hard", "r34_r18.yaml"))
    assert (cfg.DATASET.TYPE, cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == (
        "imagenet", "HARD", "ResNet34", "ResNet18")
    assert (cfg.HARD.TEMPERATURE, cfg.HARD.LOSS.KD_WEIGHT, cfg.SOLVER.BATCH_SIZE) == (1.0, 0.5, 512)
