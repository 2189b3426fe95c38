"""DOT (SOLVER.TRAINER dot): the optimizer's update by hand, the trainer's two backward passes,
fp16 scaling, resume, and the methods it refuses."""
import os

import pytest
import torch
import torch.nn as nn

from mdistiller_lakd.distillers import HARD, KD, LAKD, USKD, Vanilla
from mdistiller_lakd.engine.cfg import ConfigError, load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint
from mdistiller_lakd.engine.dot import DistillationOrientedTrainer
from mdistiller_lakd.engine.trainer import Trainer
from mdistiller_lakd.models import cifar_model_dict

from conftest import REPO_ROOT
from test_trainer import TinyNet, loaders

LR, MOMENTUM, MOMENTUM_KD, DECAY = 0.1, 0.8, 0.95, 0.01


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)


def test_update_matches_a_hand_computation_over_three_steps():
    p1, p2 = (nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in (1.0, 2.0))
    opt = DistillationOrientedTrainer([p1, p2], lr=LR, momentum=MOMENTUM, momentum_kd=MOMENTUM_KD,
                                      weight_decay=DECAY)

    def step(kd, task):
        set_grads([p1, p2], kd)
        opt.step_kd()
        assert p1.grad is None and p2.grad is None  # taken for step()
        set_grads([p1, p2], task)
        opt.step()

    # 1: p1 has both gradients (first buffers: task with decay, kd without); p2 only kd (no decay
    #    on a first kd buffer).
    step(kd=[0.5, -1.0], task=[0.2, None])
    # p1: task buf 0.2 + 0.01*1 = 0.21 -> 1 - 0.021; kd buf 0.5 -> - 0.05. p2: kd buf -1 -> 2 + 0.1
    assert (p1.item(), p2.item()) == pytest.approx((0.929, 2.1), abs=1e-12)
    # 2: both gradients for both; p2's task buffer starts.
    step(kd=[0.3, 0.4], task=[-0.1, 0.6])
    # p1: task buf 0.8*0.21 + (-0.1 + 0.01*0.929) = 0.07729; kd buf 0.95*0.5 + 0.3 = 0.775
    # p2: task buf 0.6 + 0.01*2.1 = 0.621; kd buf 0.95*(-1) + 0.4 = -0.55
    assert p1.item() == pytest.approx(0.929 - 0.1 * 0.07729 - 0.1 * 0.775, abs=1e-12)
    assert p2.item() == pytest.approx(2.1 - 0.1 * 0.621 + 0.1 * 0.55, abs=1e-12)
    # 3: p1 kd only, p2 task only: weight decay joins the one gradient, momentum (0.8+0.95)/2.
    step(kd=[0.1, None], task=[None, -0.2])
    kd_buf_1 = 0.875 * 0.775 + (0.1 + 0.01 * 0.843771)
    task_buf_2 = 0.875 * 0.621 + (-0.2 + 0.01 * 2.0929)
    assert p1.item() == pytest.approx(0.843771 - 0.1 * kd_buf_1, abs=1e-12)
    assert p2.item() == pytest.approx(2.0929 - 0.1 * task_buf_2, abs=1e-12)
    state = opt.state_dict()["state"]
    assert state[0]["momentum_buffer"].item() == pytest.approx(0.07729, abs=1e-12)  # untouched at 3
    assert state[0]["momentum_kd_buffer"].item() == pytest.approx(kd_buf_1, abs=1e-12)
    assert state[1]["momentum_buffer"].item() == pytest.approx(task_buf_2, abs=1e-12)
    assert state[1]["momentum_kd_buffer"].item() == pytest.approx(-0.55, abs=1e-12)


class TinyKD(KD):
    """KD between two TinyNets (KD's default weights and temperature)."""


def dot_trainer(tmp_path, *opts, seed=0, distiller=None) -> Trainer:
    cfg = load_cfg(None, ["SOLVER.EPOCHS", 2, "SOLVER.TRAINER", "dot",
                          "SOLVER.WEIGHT_DECAY", 0.0005, "LOG.PREFIX", str(tmp_path), "DISTILLER.TYPE", "KD",
                          "LOG.SAVE_CHECKPOINT_FREQ", 1, *opts])
    torch.manual_seed(seed)
    distiller = distiller or TinyKD(TinyNet(), TinyNet().eval(), cfg)
    return Trainer("tiny", distiller, *loaders(), cfg)


def test_trainer_steps_task_and_distillation_gradients_apart(tmp_path):
    trainer = dot_trainer(tmp_path)
    distiller = trainer.distiller
    image, target, index = next(iter(trainer.train_loader))
    weight = distiller.student.fc.weight
    before = weight.detach().clone()
    # The two gradients of this batch, as the step must take them.
    logits, losses = distiller(image=image, target=target, epoch=1)
    kd_grad, = torch.autograd.grad(losses["loss_kd"], weight, retain_graph=True)
    task_grad, = torch.autograd.grad(losses["loss_ce"], weight)
    distiller.zero_grad(set_to_none=True)
    trainer.train_step((image, target, index), epoch=1, iteration=0)
    state = trainer.optimizer.state[weight]
    assert torch.allclose(state["momentum_kd_buffer"], kd_grad, atol=1e-7)
    assert torch.allclose(state["momentum_buffer"], task_grad + 0.0005 * before, atol=1e-7)
    assert torch.allclose(weight, before - 0.05 * (task_grad + 0.0005 * before + kd_grad), atol=1e-7)


def test_fp16_loss_scaling_changes_nothing_and_skips_non_finite_steps(tmp_path):
    plain, scaled = dot_trainer(tmp_path / "a"), dot_trainer(tmp_path / "b")
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # fp16's scaler (CPU autocast has no fp16)
    batch = next(iter(plain.train_loader))
    for trainer in (plain, scaled):
        trainer.train_step(batch, epoch=1, iteration=0)
    for a, b in zip(plain.distiller.student.parameters(), scaled.distiller.student.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    before = [p.detach().clone() for p in scaled.distiller.student.parameters()]
    buffers = {key: value.clone() for key, value in scaled.optimizer.state[scaled.distiller.student.fc.weight].items()}
    # A distillation gradient that overflows float32 once scaled: the step is skipped.
    weight = scaled.distiller.student.fc.weight
    logits, losses = scaled.distiller(image=batch[0], target=batch[1], epoch=1)
    losses["loss_kd"] = losses["loss_kd"] + 1e37 * weight.sum()
    scaled.optimizer.zero_grad(set_to_none=True)
    scaled.optimization_step(losses)
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.distiller.student.parameters()))
    state = scaled.optimizer.state[scaled.distiller.student.fc.weight]
    assert all(torch.equal(state[key], buffers[key]) for key in buffers)
    assert scaled.scaler.get_scale() == 2.0**9  # backed off, as GradScaler does on a skipped step


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    whole = dot_trainer(tmp_path / "whole")
    whole.train()
    first = dot_trainer(tmp_path / "split", "SOLVER.EPOCHS", 1)
    first.train()
    saved = load_checkpoint(str(tmp_path / "split" / "tiny" / "latest"))["optimizer"]["state"]
    assert {"momentum_buffer", "momentum_kd_buffer"} <= set(saved[0])
    resumed = dot_trainer(tmp_path / "split", seed=1)  # other initial weights: all come from `latest`
    resumed.train(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.distiller.state_dict().values(),
                                                 resumed.distiller.state_dict().values()))
    got, want = resumed.optimizer.state_dict()["state"], whole.optimizer.state_dict()["state"]
    assert all(torch.equal(got[i][key], want[i][key]) for i in want for key in want[i])


def resnet8() -> nn.Module:
    return cifar_model_dict["resnet8"][0](num_classes=10)


REFUSED = {
    "NONE": (lambda cfg: Vanilla(TinyNet()), "has no teacher"),
    "USKD": (lambda cfg: USKD(resnet8(), None, cfg), "has no teacher"),
    "HARD": (lambda cfg: HARD(resnet8(), resnet8(), cfg), "back-propagates some losses itself"),
    "LAKD": (lambda cfg: LAKD(resnet8(), resnet8(), cfg), "back-propagates some losses itself"),
}


@pytest.mark.parametrize("method", list(REFUSED))
def test_methods_without_a_separable_task_loss_are_refused_before_training(tmp_path, method):
    opts = ["LAKD.BACKWARD", "eager", "LAKD.LOCATIONS", [1, 2, 3]] if method == "LAKD" else []
    cfg = load_cfg(None, ["DISTILLER.TYPE", method, *opts])
    build, why = REFUSED[method]
    with pytest.raises(ConfigError, match=f"SOLVER.TRAINER dot: DISTILLER.TYPE {method} cannot train with DOT: .*{why}"):
        dot_trainer(tmp_path, "DISTILLER.TYPE", method, *opts, distiller=build(cfg))


PAIRS = ["res110_res32", "res32x4_res8x4", "res56_res20", "vgg13_vgg8", "wrn40_2_wrn16_2", "wrn40_2_wrn40_1"]


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_dot_configs_are_the_baselines_trained_with_dot(method):
    for pair in PAIRS:
        dot = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", "dot", method, f"{pair}.yaml"))
        base = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", method, f"{pair}.yaml"))
        assert (dot.SOLVER.TRAINER, dot.SOLVER.DOT.DELTA, dot.EXPERIMENT.PROJECT) == ("dot", 0.075, "cifar100_dot")
        assert dot.EXPERIMENT.TAG == base.EXPERIMENT.TAG.replace(f"{method},", f"{method},dot,", 1)
        for cfg in (dot, base):
            cfg.defrost()
            cfg.SOLVER.TRAINER, cfg.EXPERIMENT.TAG, cfg.EXPERIMENT.PROJECT = "", "", ""
        assert dot == base


# upstream's file names -> (DATASET.TYPE, teacher, student, LR, DOT.DELTA), its values
UPSTREAM_DOT_FILES = {
    "configs/cifar100/dot/res32x4_res8x4.yaml": ("cifar100", "resnet32x4", "resnet8x4", 0.05, 0.075),
    "configs/cifar100/dot/res32x4_shuv2.yaml": ("cifar100", "resnet32x4", "ShuffleV2", 0.01, 0.075),
    "configs/cifar100/dot/vgg13_vgg8.yaml": ("cifar100", "vgg13", "vgg8", 0.05, 0.075),
    "configs/tiny_imagenet/dot/r18_mv2.yaml": ("tiny_imagenet", "ResNet18", "MobileNetV2", 0.2, 0.075),
    "configs/tiny_imagenet/dot/r18_shuv2.yaml": ("tiny_imagenet", "ResNet18", "ShuffleV2", 0.2, 0.075),
    "configs/imagenet/dot/r34_r18.yaml": ("imagenet", "ResNet34", "ResNet18", 0.2, 0.09),
    "configs/imagenet/dot/r50_mv1.yaml": ("imagenet", "ResNet50", "MobileNetV1", 0.2, 0.09),
}


@pytest.mark.parametrize("path", list(UPSTREAM_DOT_FILES))
def test_upstreams_dot_configs_load_with_its_values(path):
    cfg = load_cfg(os.path.join(REPO_ROOT, path))
    assert (cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT, cfg.SOLVER.LR, cfg.SOLVER.DOT.DELTA) == \
        UPSTREAM_DOT_FILES[path]
    assert (cfg.DISTILLER.TYPE, cfg.SOLVER.TRAINER) == ("KD", "dot")


def test_lakd_joint_backward_trains_with_dot(tmp_path):
    opts = ["DISTILLER.TYPE", "LAKD", "LAKD.BACKWARD", "joint", "LAKD.LOCATIONS", [1, 2, 3]]
    distiller = LAKD(resnet8(), resnet8(), load_cfg(None, opts))
    trainer = dot_trainer(tmp_path, *opts, distiller=distiller)
    batch = (torch.randn(4, 3, 32, 32), torch.arange(4), torch.arange(4))
    trainer.train_step(batch, epoch=1, iteration=0)
    state = trainer.optimizer.state[distiller.student.fc.weight]
    assert {"momentum_buffer", "momentum_kd_buffer"} <= set(state)


@pytest.mark.parametrize("opts, key", [(["SOLVER.NESTEROV", True], "SOLVER.NESTEROV"),
                                       (["SOLVER.DOT.DELTA", 0.95], "SOLVER.DOT.DELTA 0.95")])
def test_dot_solver_settings_it_cannot_honour_are_refused(tmp_path, opts, key):
    with pytest.raises(ConfigError, match=key):
        dot_trainer(tmp_path, *opts)
