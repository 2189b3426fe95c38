"""LAKD on every student of the zoo (one training step, with a resolution-matched teacher of its
upstream pair's family and with one of another family through connectors) and every shipped LAKD
config builds its distiller."""
import glob
import os

import pytest
import torch

from conftest import REPO_ROOT
from mdistiller_lakd.distillers import LAKD
from mdistiller_lakd.engine.build import build_model
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.lakd.blocks import find_blocks, stage_start_locations
from mdistiller_lakd.lakd.sdm import probe_shapes
from mdistiller_lakd.models import cifar_model_dict, imagenet_model_dict

NUM_CLASSES = 10
# student: (its locations by docs/METHOD.md's (1, n+1, ..., last) rule, a resolution-matched teacher of
# its upstream pair's family, one of another family whose widths differ). Small teachers keep the
# test fast; the real pairs are built in the config test.
CIFAR_STUDENTS = {
    "resnet8": ([1, 2, 3], "resnet20", "wrn_16_2"),
    "resnet14": ([1, 3, 6], "resnet8", "wrn_16_2"),
    "resnet20": ([1, 4, 9], "resnet8", "wrn_16_2"),
    "resnet32": ([1, 6, 15], "resnet8", "wrn_16_2"),
    "resnet44": ([1, 8, 21], "resnet8", "wrn_16_2"),
    "resnet8x4": ([1, 2, 3], "resnet8x4", "wrn_16_2"),
    "ResNet18": ([1, 3, 5, 8], "ResNet18", "wrn_16_2"),
    "wrn_16_1": ([1, 3, 6], "wrn_16_2", "resnet8x4"),
    "wrn_16_2": ([1, 3, 6], "wrn_16_1", "resnet8"),
    "wrn_40_1": ([1, 7, 18], "wrn_16_2", "resnet8x4"),
    "vgg8": ([1, 2, 3, 5], "vgg8", "wrn_16_2"),
    "vgg11": ([1, 2, 3, 5], "vgg8", "wrn_16_2"),
    "vgg16": ([1, 2, 3, 5], "vgg8", "wrn_16_2"),
    "vgg19": ([1, 2, 3, 5], "vgg8", "wrn_16_2"),
    "MobileNetV2": ([1, 4, 7, 17], "ResNet18", "vgg8"),
    "ShuffleV1": ([1, 5, 16], "resnet8x4", "vgg8"),
    "ShuffleV2": ([1, 5, 16], "resnet8x4", "vgg8"),
}


def test_every_cifar_student_is_covered_and_its_rule_locations_are_right():
    students = {name for name, (_, checkpoint) in cifar_model_dict.items() if checkpoint is None}
    assert students == set(CIFAR_STUDENTS)
    for name, (locations, _, _) in CIFAR_STUDENTS.items():
        student = cifar_model_dict[name][0](num_classes=NUM_CLASSES)
        blocks = [block for _, block in find_blocks(student)]
        shapes = probe_shapes(student, blocks, student, 32)[0]
        assert stage_start_locations([shape[1:] for shape in shapes]) == locations, name


def train_one_step(student, teacher, student_name: str, locations: list, image_size: int, *opts) -> LAKD:
    """LAKD at ``locations``, one forward and backward; checks the losses and gradients."""
    cfg = load_cfg(None, ["DISTILLER.STUDENT", student_name, "LAKD.LOCATIONS", str(locations), *opts])
    plain_keys = list(student.state_dict())
    distiller = LAKD(student, teacher, cfg).train()
    image = torch.randn(2, 3, image_size, image_size)
    logits, losses = distiller(image=image, target=torch.tensor([0, 1]), epoch=1)
    assert logits.shape == (2, student.state_dict()[plain_keys[-1]].shape[0])
    assert list(losses) == [f"loss_local_{k}" for k in range(1, len(locations))] + ["loss_ce", "loss_cat"]
    sum(losses.values()).backward()
    assert all(torch.isfinite(loss) for loss in losses.values())
    for name, parameter in [*student.named_parameters(), *distiller.sdm.named_parameters()]:
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert list(student.state_dict()) == plain_keys
    return distiller


@pytest.mark.parametrize("student_name", sorted(CIFAR_STUDENTS))
def test_cifar_student_trains_a_step(student_name):
    locations, family_teacher, other_teacher = CIFAR_STUDENTS[student_name]
    torch.manual_seed(0)
    for teacher_name in (family_teacher, other_teacher):
        student = cifar_model_dict[student_name][0](num_classes=NUM_CLASSES)
        teacher = cifar_model_dict[teacher_name][0](num_classes=NUM_CLASSES).eval()
        distiller = train_one_step(student, teacher, student_name, locations, 32)
        if teacher_name == other_teacher:
            assert distiller.get_extra_parameters() > 0  # the connectors are engaged


def test_imagenet_resnet18_trains_a_step():
    torch.manual_seed(0)
    student, teacher = imagenet_model_dict["ResNet18"](num_classes=10), imagenet_model_dict["ResNet34"](num_classes=10)
    distiller = train_one_step(student, teacher.eval(), "ResNet18", [1, 2, 4, 8], 64, "DATASET.TYPE", "imagenet")
    assert distiller.teacher_stages == [1, 1, 2] and distiller.get_extra_parameters() == 0


LAKD_CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*", "lakd", "**", "*.yaml"), recursive=True))
PAPER_CONFIGS = [path for path in LAKD_CONFIGS if os.sep + "paper" + os.sep in path]
BUILT_CONFIGS = [path for path in LAKD_CONFIGS if path not in PAPER_CONFIGS]


def test_the_shipped_configs_are_all_found():
    assert len(PAPER_CONFIGS) == 6 and len(BUILT_CONFIGS) == 6 + 1 + 8 + 1


@pytest.mark.parametrize("path", BUILT_CONFIGS, ids=lambda path: os.path.relpath(path, REPO_ROOT))
def test_config_builds_its_distiller(path):
    cfg = load_cfg(path)
    assert cfg.DISTILLER.TYPE == "LAKD"
    dataset, num_classes = cfg.DATASET.TYPE, {"cifar100": 100, "cifar10": 10, "imagenet": 1000}[cfg.DATASET.TYPE]
    student = build_model(cfg.DISTILLER.STUDENT, dataset, num_classes, "DISTILLER.STUDENT")
    teacher = build_model(cfg.DISTILLER.TEACHER, dataset, num_classes, "DISTILLER.TEACHER")
    distiller = LAKD(student, teacher, cfg)
    name = os.path.basename(path)[: -len(".yaml")]
    if dataset == "imagenet":
        assert distiller.locations == [1, 2, 4, 8]  # the paper's
    elif "ablation" in path:
        # Table 3 moves the cuts (named in the file); Table 5 keeps the stage ends [3, 6, 9].
        assert distiller.locations == ([int(n) for n in name.split("_")[-3:]] if "detach" in name else [3, 6, 9])
    else:
        blocks = [block for _, block in find_blocks(student)]
        shapes = probe_shapes(student, blocks, student, 32)[0]
        assert distiller.locations == stage_start_locations([shape[1:] for shape in shapes])


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=os.path.basename)
def test_paper_recipe_configs_differ_from_the_standard_ones_in_the_solver_only(path):
    paper, standard = load_cfg(path), load_cfg(os.path.join(os.path.dirname(os.path.dirname(path)), os.path.basename(path)))
    assert paper.LAKD == standard.LAKD and paper.DISTILLER == standard.DISTILLER
    assert (paper.SOLVER.EPOCHS, paper.SOLVER.NESTEROV, paper.SOLVER.SCHEDULER, paper.SOLVER.LR) == (300, True, "linear", 0.05)
