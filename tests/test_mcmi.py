"""MCMI: the loss and a centroid update against hand computations, the initial centroid pass, the
centroid buffer through a checkpoint, the CMI metric against its direct formula, the builder's
errors, and tools/train.py with a kill and --resume, then tools/analyze.py cmi on the result."""
import copy
import json
import math
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.analysis.runs import parse_worklog
from mdistiller_lakd.dataset import class_pool
from mdistiller_lakd.distillers import MCMI, distiller_dict
from mdistiller_lakd.engine.build import build_distiller
from mdistiller_lakd.engine.cfg import CFG, ConfigError, load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint, save_checkpoint
from mdistiller_lakd.engine.metrics import CMIAccumulator, conditional_mutual_information
from mdistiller_lakd.models import cifar_model_dict
from test_trainer import KILL_MID_EPOCH


class LinearLogits(nn.Module):
    """logits = x @ W (W the identity at first), in the zoo's (logits, features) output form."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(num_classes))

    def forward(self, x):
        return x @ self.weight, {}


def mcmi_cfg(*opts):
    return load_cfg(None, ["DISTILLER.TYPE", "MCMI", *opts])


def two_class_mcmi(*opts) -> MCMI:
    distiller = MCMI(LinearLogits(2), None, mcmi_cfg("MCMI.LOSS.CMI_WEIGHT", 0.15, *opts), num_classes=2)
    distiller.centroids.copy_(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    return distiller.train()


# p for logits (0, ln 3) and (0, 0): (1/4, 3/4) and (1/2, 1/2).
LOGITS = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
TARGET = torch.tensor([0, 1])


def test_loss_against_hand_computation():
    _, losses = two_class_mcmi()(image=LOGITS, target=TARGET, epoch=1)
    # KL(p || Q_y) with the true label's row: sample 1 against (1/2, 1/2), sample 2 against (0.9, 0.1).
    kl_1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_2 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert set(losses) == {"loss_ce", "loss_cmi"}
    assert losses["loss_cmi"].item() == pytest.approx(-0.15 * (kl_1 + kl_2) / 2, rel=1e-6)
    assert losses["loss_ce"].item() == pytest.approx((-math.log(0.25) - math.log(0.5)) / 2, rel=1e-6)


def test_gradient_flows_through_both_factors_of_the_kl():
    distiller = two_class_mcmi()
    logits = LOGITS.clone().requires_grad_(True)
    _, losses = distiller(image=logits, target=TARGET, epoch=1)
    (ours,) = torch.autograd.grad(losses["loss_cmi"], logits)
    centroids = distiller.centroids[TARGET]

    def reference(z, detach_weight):  # param[1] · batchmean KL(p || Q_y), as the released code writes it
        log_p = F.log_softmax(z, 1)
        weight = log_p.exp().detach() if detach_weight else log_p.exp()
        return -0.15 * (weight * (log_p - centroids.log())).sum() / len(z)

    expected = F.kl_div(centroids.log(), F.log_softmax(logits, 1), reduction="batchmean", log_target=True) * -0.15
    (full,) = torch.autograd.grad(expected, logits)
    (weight_detached,) = torch.autograd.grad(reference(logits, True), logits)
    assert torch.allclose(ours, full, atol=1e-7)
    assert not torch.allclose(ours, weight_detached, atol=1e-4)  # the p weight carries gradient too


def test_one_centroid_update_against_hand_arithmetic():
    distiller = two_class_mcmi("MCMI.CENTROID_DECAY", 0.75)
    distiller.centroids.copy_(torch.tensor([[2.0, 1.0], [1.0, 1.0]]))  # unnormalised: renormalising shows
    images = torch.stack([LOGITS, torch.tensor([[math.log(3.0), 0.0]] * 2)])  # [C=2, s=2, 2]
    distiller.update_centroids(images)
    # Class 0: mean softmax (3/8, 5/8); 0.75 (2, 1) + 0.25 (3/8, 5/8) = (1.59375, 0.90625), sum 2.5.
    # Class 1: mean softmax (3/4, 1/4); 0.75 (1, 1) + 0.25 (3/4, 1/4) = (0.9375, 0.8125), sum 1.75.
    expected = torch.tensor([[1.59375 / 2.5, 0.90625 / 2.5], [0.9375 / 1.75, 0.8125 / 1.75]])
    assert torch.allclose(distiller.centroids, expected, atol=1e-7)


def test_pool_draws_the_same_indices_for_every_class_and_updates_before_the_loss():
    cfg = mcmi_cfg("MCMI.UPDATE_CENTROIDS", True, "MCMI.SAMPLES_PER_CLASS", 3, "MCMI.CENTROID_DECAY", 0.0)
    pool = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)  # entry = its position
    distiller = MCMI(LinearLogits(2), None, cfg, num_classes=2, class_pool=pool.unsqueeze(-1).unsqueeze(-1))
    torch.manual_seed(3)
    drawn = distiller.draw_pool_images().flatten(2)
    torch.manual_seed(3)
    idx = torch.randperm(5)[:3]
    assert torch.equal(drawn, pool[:, idx])
    assert "class_pool" not in distiller.state_dict()
    with pytest.raises(ValueError, match="MCMI.UPDATE_CENTROIDS"):
        MCMI(LinearLogits(2), None, cfg, num_classes=2)


def test_init_centroids_is_the_per_class_mean_softmax_in_train_mode():
    torch.manual_seed(0)
    student = cifar_model_dict["resnet8"][0](num_classes=3).eval()
    distiller = MCMI(student, None, mcmi_cfg(), num_classes=3)
    batches = [(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6)) for _ in range(2)]
    expected_student = copy.deepcopy(student).train()
    with torch.no_grad():
        p = torch.cat([F.softmax(expected_student(image)[0], 1) for image, _, _ in batches])
    targets = torch.cat([target for _, target, _ in batches])
    expected = torch.stack([p[targets == c].mean(0) for c in range(3)])
    initial = distiller.init_centroids(batches)
    assert torch.allclose(distiller.centroids, expected, atol=1e-6)
    assert not student.training  # its mode restored
    # BatchNorm running statistics moved as in the train-mode pass of the copy.
    assert torch.allclose(student.bn1.running_mean, expected_student.bn1.running_mean)
    assert initial == pytest.approx(conditional_mutual_information(torch.log(p), targets, 3), rel=1e-5)
    with pytest.raises(ValueError, match=r"no training sample of classes \[2\]"):
        distiller.init_centroids([(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))])


def test_centroids_survive_a_checkpoint_and_the_pool_is_not_saved(tmp_path):
    cfg = mcmi_cfg("MCMI.UPDATE_CENTROIDS", True, "MCMI.SAMPLES_PER_CLASS", 1)
    distiller = MCMI(LinearLogits(3), None, cfg, num_classes=3, class_pool=torch.randn(3, 2, 1, 1, 3))
    distiller.centroids.copy_(torch.softmax(torch.randn(3, 3), 1))
    save_checkpoint({"model": distiller.state_dict()}, str(tmp_path / "latest"))
    restored = MCMI(LinearLogits(3), None, cfg, num_classes=3, class_pool=torch.zeros(3, 2, 1, 1, 3))
    restored.load_state_dict(load_checkpoint(str(tmp_path / "latest"))["model"], strict=True)
    assert set(restored.state_dict()) == {"student.weight", "centroids"}
    assert torch.equal(restored.centroids, distiller.centroids)


def test_cmi_metric_streams_to_the_direct_formula():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(40, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 4, (40,), generator=generator)  # class 4 has no sample: skipped
    p = logits.softmax(1)
    centroids = torch.stack([p[targets == c].mean(0) if (targets == c).any() else torch.ones(5) for c in range(5)])
    direct = (p * (p.log() - centroids[targets].log())).sum(1).mean().item()
    assert conditional_mutual_information(logits, targets, 5) == pytest.approx(direct, rel=1e-10)
    streamed = CMIAccumulator()
    for chunk in range(0, 40, 7):
        streamed.update(logits[chunk:chunk + 7].float(), targets[chunk:chunk + 7])
    assert streamed.compute() == pytest.approx(direct, rel=1e-5)
    same = torch.zeros(6, 3)  # every prediction equal to its class centroid: no information
    assert conditional_mutual_information(same, torch.tensor([0, 1, 2, 0, 1, 2]), 3) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Builder and config


def test_node_defaults():
    assert CFG.MCMI.INIT_CKPT == "" and CFG.MCMI.LOSS.CE_WEIGHT == 1.0 and CFG.MCMI.LOSS.CMI_WEIGHT == 0.15
    assert (CFG.MCMI.UPDATE_CENTROIDS, CFG.MCMI.CENTROID_DECAY) == (False, 0.9999)
    assert (CFG.MCMI.SAMPLES_PER_CLASS, CFG.MCMI.POOL_PER_CLASS) == (8, 500)
    assert distiller_dict["MCMI"] is MCMI and not MCMI.requires_teacher


@pytest.mark.parametrize("teacher", ["resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50"])
def test_shipped_configs_carry_the_reference_recipe(teacher):
    cfg = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", "mcmi", f"{teacher}.yaml"))
    solver = cfg.SOLVER
    assert (cfg.DISTILLER.TYPE, cfg.DISTILLER.STUDENT, cfg.EXPERIMENT.PROJECT) == ("MCMI", teacher, "cifar100_mcmi")
    assert (solver.EPOCHS, solver.BATCH_SIZE, solver.LR, solver.SCHEDULER) == (20, 64, 0.05, "cosine")
    assert (solver.WEIGHT_DECAY, solver.MOMENTUM, solver.TYPE) == (0.0005, 0.9, "SGD")
    assert (cfg.MCMI.LOSS.CE_WEIGHT, cfg.MCMI.LOSS.CMI_WEIGHT, cfg.MCMI.UPDATE_CENTROIDS) == (1.0, 0.15, False)
    kd = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", "mcmi", "kd", "res56_res20.yaml"))
    assert kd.DISTILLER.TEACHER_CKPT == "output/cifar100_mcmi/mcmi,resnet56/student_best"


@pytest.fixture
def init_ckpt(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "resnet8.pth")
    save_checkpoint({"model": cifar_model_dict["resnet8"][0](num_classes=100).state_dict()}, path)
    return path


def build(*opts):
    cfg = load_cfg(None, ["DISTILLER.TYPE", "MCMI", "DISTILLER.STUDENT", "resnet8", *opts])
    return build_distiller(cfg, num_classes=100, num_data=64)


def test_builder_loads_the_init_checkpoint_and_no_teacher(init_ckpt):
    # DISTILLER.TEACHER names no model: it is not read.
    distiller = build("MCMI.INIT_CKPT", init_ckpt, "DISTILLER.TEACHER", "no_such_model")
    assert distiller.teacher is None
    saved = load_checkpoint(init_ckpt)["model"]
    assert all(torch.equal(value, saved[key]) for key, value in distiller.student.state_dict().items())


@pytest.mark.parametrize("opts, message", [
    (["MCMI.INIT_CKPT", "missing.pth"], "MCMI.INIT_CKPT: checkpoint not found: missing.pth"),
    (["MCMI.LOSS.CMI_WEIGHT", "-0.15"],
     "λ ≥ 0 maximises the CMI; the reference's `--param 1 -0.15` is CMI_WEIGHT 0.15"),
    (["MCMI.CENTROID_DECAY", "1.0"], "MCMI.CENTROID_DECAY must be in [0, 1)"),
    (["MCMI.UPDATE_CENTROIDS", "True", "MCMI.SAMPLES_PER_CLASS", "0"], "MCMI.SAMPLES_PER_CLASS must be between 1"),
    (["DATASET.TYPE", "cifar10"], "set MCMI.INIT_CKPT to a trained checkpoint"),
])
def test_builder_errors_name_the_key(opts, message):
    with pytest.raises(ConfigError) as info:
        build(*opts)
    assert message in str(info.value)


def test_init_checkpoint_of_another_architecture_names_the_key(tmp_path):
    path = str(tmp_path / "wrn.pth")
    save_checkpoint({"model": cifar_model_dict["wrn_16_2"][0](num_classes=100).state_dict()}, path)
    with pytest.raises(ConfigError, match=r"MCMI: MCMI.INIT_CKPT: checkpoint .*wrn.pth does not fit the model 'resnet8'"):
        build("MCMI.INIT_CKPT", path)


def test_class_pool_takes_each_class_once_through_the_training_transform(cifar100_root):
    cfg = load_cfg(None, ["DATASET.ROOT", cifar100_root, "DATASET.DOWNLOAD", False])
    with pytest.raises(FileNotFoundError, match="the class pool needs training images of every class; none of classes"):
        class_pool(cfg, per_class=5, seed=0)  # 64 images: classes 64..99 have none
    write_cifar(cifar100_root, "cifar100", num_train=300, num_test=10)
    pool = class_pool(cfg, per_class=5, seed=0)
    assert pool.shape == (100, 3, 3, 32, 32) and torch.equal(pool, class_pool(cfg, per_class=5, seed=0))
    with pytest.raises(ConfigError, match="MCMI.UPDATE_CENTROIDS: .* CIFAR-10/100 only"):
        class_pool(load_cfg(None, ["DATASET.TYPE", "imagenet"]), per_class=5, seed=0)


# --------------------------------------------------------------------------------------------------
# tools/train.py and tools/analyze.py cmi

CONFIG = os.path.join("configs", "cifar100", "mcmi", "resnet56.yaml")


def train(folder: str, resume: bool = False, patch: str = "") -> tuple[subprocess.CompletedProcess, str]:
    overrides = [
        "DISTILLER.STUDENT", "resnet8", "MCMI.INIT_CKPT", os.path.join(folder, "init.pth"),
        "MCMI.UPDATE_CENTROIDS", "True", "MCMI.POOL_PER_CLASS", "1", "MCMI.SAMPLES_PER_CLASS", "1",
        "MCMI.CENTROID_DECAY", "0.5", "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "50",
        "LOG.SAVE_CHECKPOINT_FREQ", "1", "DATASET.ROOT", os.path.join(folder, "data"), "DATASET.DOWNLOAD", "False",
        "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", os.path.join(folder, "out"),
    ]
    launcher = ["tools/train.py"]
    if patch:
        launcher = ["-c", patch + "\nimport runpy\nrunpy.run_path('tools/train.py', run_name='__main__')"]
    args = ["--cfg", CONFIG] + (["--resume"] if resume else []) + overrides
    result = subprocess.run([sys.executable, *launcher, *args], cwd=REPO_ROOT, capture_output=True, text=True)
    run_dirs = [root for root, _, files in os.walk(os.path.join(folder, "out")) if "worklog.txt" in files]
    return result, run_dirs[0] if run_dirs else ""


def prepare(folder: str) -> None:
    write_cifar(os.path.join(folder, "data"), "cifar100", num_train=100, num_test=20)  # one image a class
    torch.manual_seed(0)
    model = cifar_model_dict["resnet8"][0](num_classes=100)
    save_checkpoint({"model": model.state_dict()}, os.path.join(folder, "init.pth"))


def test_train_resume_and_analyze_cmi(tmp_path):
    finished, killed = str(tmp_path / "finished"), str(tmp_path / "killed")
    for folder in (finished, killed):
        prepare(folder)
    result, run_dir = train(finished)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(run_dir, "worklog.txt")) as f:
        text = f.read()
    epochs, _ = parse_worklog(text)
    assert len(re.findall(r"^initial_cmi: \d+\.\d{4}$", text, flags=re.M)) == 1
    assert list(epochs) == [1, 2] and all({"test_cmi", "train_loss_cmi", "train_loss_ce"} <= set(v) for v in epochs.values())
    state = load_checkpoint(os.path.join(run_dir, "latest"))["model"]
    assert "class_pool" not in state and not torch.allclose(state["centroids"], torch.full((100, 100), 0.01))

    dying, run_dir_killed = train(killed, patch=KILL_MID_EPOCH)
    assert dying.returncode == -9, dying.stderr[-3000:]
    resumed, run_dir_killed = train(killed, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = load_checkpoint(os.path.join(run_dir_killed, "latest"))["model"]
    assert got.keys() == state.keys() and all(torch.equal(got[key], state[key]) for key in state)
    with open(os.path.join(run_dir_killed, "worklog.txt")) as f:
        assert f.read().count("initial_cmi") == 1  # no second initial pass on --resume

    pytest.importorskip("matplotlib")
    analyze_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "analyze.py"))["main"]
    out = str(tmp_path / "cmi.png")
    opts = ["--opts", "DATASET.ROOT", os.path.join(finished, "data"), "DATASET.NUM_WORKERS", "0"]
    assert analyze_main(["cmi", run_dir, "--split", "test", "--out", out, *opts]) == 0
    with open(os.path.join(str(tmp_path), "cmi.json")) as f:
        (entry,) = json.load(f)["models"]
    epochs_best = epochs[max(epochs, key=lambda epoch: (epochs[epoch]["test_acc"], epoch))]  # student_best's
    assert entry["images"] == 20 and entry["top1"] == pytest.approx(epochs_best["test_acc"])
    assert entry["cmi"] == pytest.approx(epochs_best["test_cmi"], abs=6e-5)  # the worklog's 4 digits
    before = ["cmi", "--ckpt", os.path.join(finished, "init.pth"), "--cfg", os.path.join(run_dir, "config.yaml")]
    assert analyze_main([*before, "--out", out, *opts]) == 0
    with open(os.path.join(str(tmp_path), "cmi.json")) as f:
        (entry,) = json.load(f)["models"]
    # One training image a class: each prediction is its class's centroid, so no information is left.
    assert entry["images"] == 100 and entry["split"] == "train" and entry["cmi"] == pytest.approx(0.0, abs=1e-9)
