"""The baselines' configs: upstream's files load unmodified; ours carry the papers' values and train.

The upstream fixtures reproduce the key/value structure of upstream mdistiller's
``configs/cifar100/{kd,at,fitnet,rkd,ofd,crd,reviewkd,vid,pkt,sp,nst,kdsvd}.yaml``,
``configs/cifar100/dkd/*.yaml`` and ``configs/imagenet/{r34_r18,r50_mv1}/reviewkd.yaml`` and of
CAT-KD's ``configs/cifar100/CAT_KD/*.yaml`` (one entry per file, named by its upstream path).
"""
import glob
import os

import pytest
import torch

from conftest import REPO_ROOT
from mdistiller_lakd.distillers import distiller_dict
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.models import cifar_model_dict, imagenet_model_dict

MDISTILLER_SOLVER = """SOLVER:
  BATCH_SIZE: 64
  EPOCHS: 240
  LR: {lr}
  LR_DECAY_STAGES: [150, 180, 210]
  LR_DECAY_RATE: 0.1
  WEIGHT_DECAY: 0.0005
  MOMENTUM: 0.9
  TYPE: "SGD"
"""


def mdistiller_yaml(tag, method, teacher, student, lr=0.05, tail=""):
    """Upstream mdistiller's CIFAR-100 config layout."""
    return (
        f'EXPERIMENT:\n  NAME: ""\n  TAG: "{tag}"\n  PROJECT: "cifar100_baselines"\n'
        f'DISTILLER:\n  TYPE: "{method}"\n  TEACHER: "{teacher}"\n  STUDENT: "{student}"\n'
        + MDISTILLER_SOLVER.format(lr=lr) + tail
    )


def mdistiller_imagenet_yaml(tag, method, teacher, student, tail):
    """Upstream mdistiller's ImageNet config layout."""
    return (
        f'EXPERIMENT:\n  NAME: ""\n  TAG: "{tag}"\n  PROJECT: "imagenet_baselines"\n'
        'DATASET:\n  TYPE: "imagenet"\n  NUM_WORKERS: 32\n  TEST:\n    BATCH_SIZE: 128\n'
        f'DISTILLER:\n  TYPE: "{method}"\n  TEACHER: "{teacher}"\n  STUDENT: "{student}"\n'
        "SOLVER:\n  BATCH_SIZE: 256\n  EPOCHS: 100\n  LR: 0.1\n  LR_DECAY_STAGES: [30, 60, 90]\n  LR_DECAY_RATE: 0.1\n"
        '  WEIGHT_DECAY: 0.0001\n  MOMENTUM: 0.9\n  TYPE: "SGD"\nLOG:\n  TENSORBOARD_FREQ: 50\n  SAVE_CHECKPOINT_FREQ: 10\n'
        + tail
    )


REVIEWKD_IMAGENET = (
    "REVIEWKD:\n  CE_WEIGHT: 1.0\n  REVIEWKD_WEIGHT: {weight}\n  WARMUP_EPOCHS: 1\n  SHAPES: [1,7,14,28,56]\n"
    "  OUT_SHAPES: [1,7,14,28,56]\n  IN_CHANNELS: {in_channels}\n  OUT_CHANNELS: {out_channels}\n{extra}  STU_PREACT: True\n"
)


def cat_kd_yaml(name, teacher, student, lr, weight, resolution, normalize, device=0, wandb=False):
    """CAT-KD's CIFAR-100 config layout (its comments and its model-surgery switches included)."""
    log = "LOG:\n  WANDB: False\n  \n" if wandb else ""
    return (
        f'EXPERIMENT:\n  NAME: "{name}"\n  TAG: "{name}"\n  PROJECT: "{name}"\n'
        f'DISTILLER:\n  TYPE: "CAT_KD"\n  TEACHER: "{teacher}"\n  STUDENT: "{student}"\n'
        + MDISTILLER_SOLVER.format(lr=lr) + "\n" + log
        + "CAT_KD:\n  LOSS:\n    # β\n"
        + f"    CAT_loss_weight: {weight}\n"
        + "    # the resolution of the transferred CAMs after the average pooling function\n"
        + f"    CAM_RESOLUTION: {resolution}\n    CE_WEIGHT: 1.\n"
        + f"  #True: CAT\n  #False: CAT-KD\n  onlyCAT: False\n  IF_NORMALIZE: {normalize}\n\n"
        + f"# true: convert the normal CNN to our style\nif_test: True\ndevice: {device}\n"
    )


BETA = "DKD:\n  BETA: {}\n"
UPSTREAM_FILES = {
    # megvii-research/mdistiller
    "configs/cifar100/kd.yaml": mdistiller_yaml("kd,res32x4,res8x4", "KD", "resnet32x4", "resnet8x4"),
    "configs/cifar100/at.yaml": mdistiller_yaml("at,res32x4,res8x4", "AT", "resnet32x4", "resnet8x4"),
    "configs/cifar100/fitnet.yaml": mdistiller_yaml("fitnet,res32x4,res8x4", "FITNET", "resnet32x4", "resnet8x4"),
    "configs/cifar100/rkd.yaml": mdistiller_yaml("rkd,res32x4,res8x4", "RKD", "resnet32x4", "resnet8x4"),
    "configs/cifar100/ofd.yaml": mdistiller_yaml("ofd,res32x4,res8x4", "OFD", "resnet32x4", "resnet8x4"),
    "configs/cifar100/crd.yaml": mdistiller_yaml(
        "crd,res32x4,res8x4", "CRD", "resnet32x4", "resnet8x4", tail='  TRAINER: "crd" \n'
    ),
    "configs/cifar100/reviewkd.yaml": mdistiller_yaml(
        "reviewkd,res32x4,res8x4", "REVIEWKD", "resnet32x4", "resnet8x4", tail="REVIEWKD:\n  REVIEWKD_WEIGHT: 5.0\n"
    ),
    **{
        f"configs/cifar100/{name}.yaml": mdistiller_yaml(f"{name},res32x4,res8x4", name.upper(), "resnet32x4", "resnet8x4")
        for name in ("vid", "pkt", "sp", "nst", "kdsvd")
    },
    "configs/imagenet/r34_r18/reviewkd.yaml": mdistiller_imagenet_yaml(
        "reviewkd,res34,res18", "REVIEWKD", "ResNet34", "ResNet18", REVIEWKD_IMAGENET.format(
            weight=1.0, in_channels="[64,128,256,512,512]", out_channels="[64,128,256,512,512]", extra="")
    ),
    "configs/imagenet/r50_mv1/reviewkd.yaml": mdistiller_imagenet_yaml(
        "reviewkd,res50,mobilenetv1", "REVIEWKD", "ResNet50", "MobileNetV1", REVIEWKD_IMAGENET.format(
            weight=8.0, in_channels="[128,256,512,1024,1024]", out_channels="[256,512,1024,2048,2048]",
            extra="  MAX_MID_CHANNEL: 256\n")
    ),
    "configs/cifar100/dkd/res56_res20.yaml": mdistiller_yaml(
        "dkd,res56,res20", "DKD", "resnet56", "resnet20", tail=BETA.format(2.0)
    ),
    "configs/cifar100/dkd/res110_res32.yaml": mdistiller_yaml(
        "dkd,res110,res32", "DKD", "resnet110", "resnet32", tail=BETA.format(2.0)
    ),
    "configs/cifar100/dkd/res32x4_res8x4.yaml": mdistiller_yaml("dkd,res32x4,res8x4", "DKD", "resnet32x4", "resnet8x4"),
    "configs/cifar100/dkd/res32x4_shuv1.yaml": mdistiller_yaml("dkd,res32x4,shuv1", "DKD", "resnet32x4", "ShuffleV1", 0.01),
    "configs/cifar100/dkd/res32x4_shuv2.yaml": mdistiller_yaml("dkd,res32x4,shuv2", "DKD", "resnet32x4", "ShuffleV2", 0.01),
    "configs/cifar100/dkd/res50_mv2.yaml": mdistiller_yaml("dkd,res50,mv2", "DKD", "ResNet50", "MobileNetV2", 0.01),
    "configs/cifar100/dkd/vgg13_mv2.yaml": mdistiller_yaml(
        "dkd,vgg13,mv2", "DKD", "vgg13", "MobileNetV2", 0.01, BETA.format(6.0)
    ),
    "configs/cifar100/dkd/vgg13_vgg8.yaml": mdistiller_yaml("dkd,vgg13,vgg8", "DKD", "vgg13", "vgg8", tail=BETA.format(6.0)),
    "configs/cifar100/dkd/wrn40_2_shuv1.yaml": mdistiller_yaml("dkd,wrn_40_2,shuv1", "DKD", "wrn_40_2", "ShuffleV1", 0.01),
    "configs/cifar100/dkd/wrn40_2_wrn_16_2.yaml": mdistiller_yaml(
        "dkd,wrn_40_2,wrn_16_2", "DKD", "wrn_40_2", "wrn_16_2", tail=BETA.format(6.0)
    ),
    "configs/cifar100/dkd/wrn40_2_wrn_40_1.yaml": mdistiller_yaml(
        "dkd,wrn_40_2,wrn_40_1", "DKD", "wrn_40_2", "wrn_40_1", tail=BETA.format(6.0)
    ),
    # GzyAftermath/CAT-KD
    "CAT_KD/res56_res20.yaml": cat_kd_yaml("res56_res20", "resnet56", "resnet20", 0.05, 0.7, 2, False),
    "CAT_KD/res110_res32.yaml": cat_kd_yaml("res110_res32", "resnet110", "resnet32", 0.05, 1.8, 2, False),
    "CAT_KD/res32x4_res8x4.yaml": cat_kd_yaml(
        "resnet32x4,resnet8x4", "resnet32x4", "resnet8x4", 0.05, "15.", 2, False, wandb=True
    ),
    "CAT_KD/res32x4_shuv1.yaml": cat_kd_yaml(
        "res32x4_shuv1", "resnet32x4", "ShuffleV1", 0.01, "600.", 4, True, device=1, wandb=True
    ),
    "CAT_KD/res32x4_shuv2.yaml": cat_kd_yaml("res32x4_shuv2", "resnet32x4", "ShuffleV2", 0.01, "600.", 4, True),
    "CAT_KD/res50_mv2.yaml": cat_kd_yaml("res50_mv2", "ResNet50", "MobileNetV2", 0.01, "40.", 2, True),
    "CAT_KD/vgg13_mv2.yaml": cat_kd_yaml("vgg13_mv2", "vgg13", "MobileNetV2", 0.01, "15.", 2, True),
    "CAT_KD/vgg13_vgg8.yaml": cat_kd_yaml("vgg13_vgg8", "vgg13", "vgg8", 0.05, 4.5, 2, False),
    "CAT_KD/wrn40_2_shuv1.yaml": cat_kd_yaml("wrn_40_2,shuv1", "wrn_40_2", "ShuffleV1", 0.01, "80.", 4, True),
    "CAT_KD/wrn_40_2_wrn_16_2.yaml": cat_kd_yaml("wrn_40_2_wrn_16_2", "wrn_40_2", "wrn_16_2", 0.05, "12.", 2, False),
    "CAT_KD/wrn_40_2_wrn_40_1.yaml": cat_kd_yaml("wrn_40_2_wrn_40_1", "wrn_40_2", "wrn_40_1", 0.05, 1.5, 2, False),
}


def write_upstream(tmp_path, upstream_path):
    path = tmp_path / upstream_path.replace("/", "_")
    path.write_text(UPSTREAM_FILES[upstream_path], encoding="utf-8")
    return str(path)


def one_step(cfg, image_size, num_classes):
    """Build ``cfg``'s distiller around random-weight models and take one SGD step on 2 images."""
    method = cfg.DISTILLER.TYPE
    if cfg.DATASET.TYPE == "imagenet":
        build = lambda name: imagenet_model_dict[name](pretrained=False)  # noqa: E731
    else:
        build = lambda name: cifar_model_dict[name][0](num_classes=num_classes)  # noqa: E731
    extra = {"num_data": 8} if method == "CRD" else {}
    distiller = distiller_dict[method](build(cfg.DISTILLER.STUDENT), build(cfg.DISTILLER.TEACHER), cfg, **extra)
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=cfg.SOLVER.LR, momentum=cfg.SOLVER.MOMENTUM)
    _, losses = distiller.train()(
        image=torch.randn(2, 3, image_size, image_size),
        target=torch.tensor([0, num_classes - 1]),
        index=torch.tensor([0, 1]),
        contrastive_index=torch.randint(0, 8, (2, cfg.CRD.NCE.K + 1)),
        epoch=1,
    )
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return losses


@pytest.mark.parametrize("upstream_path", sorted(UPSTREAM_FILES))
def test_upstream_configs_load_unmodified(tmp_path, upstream_path):
    cfg = load_cfg(write_upstream(tmp_path, upstream_path))
    assert cfg.DISTILLER.TYPE in distiller_dict
    if "imagenet" in upstream_path:
        assert cfg.SOLVER.WEIGHT_DECAY == 0.0001 and cfg.SOLVER.EPOCHS == 100
    else:
        assert cfg.SOLVER.WEIGHT_DECAY == 0.0005 and cfg.SOLVER.EPOCHS == 240


# Upstream's files leave these to its defaults.
UPSTREAM_DEFAULTS = {
    "KD.TEMPERATURE": 4, "KD.LOSS.CE_WEIGHT": 0.1, "KD.LOSS.KD_WEIGHT": 0.9, "AT.P": 2,
    "AT.LOSS.FEAT_WEIGHT": 1000.0, "FITNET.HINT_LAYER": 2, "FITNET.LOSS.FEAT_WEIGHT": 100.0,
    "RKD.DISTANCE_WEIGHT": 25, "RKD.ANGLE_WEIGHT": 50, "RKD.PDIST.EPSILON": 1e-12,
    "OFD.LOSS.FEAT_WEIGHT": 0.001, "OFD.CONNECTOR.KERNEL_SIZE": 1, "CRD.FEAT.DIM": 128,
    "CRD.FEAT.STUDENT_DIM": 256, "CRD.FEAT.TEACHER_DIM": 256, "CRD.LOSS.FEAT_WEIGHT": 0.8,
    "CRD.NCE.K": 16384, "CRD.NCE.MOMENTUM": 0.5, "CRD.NCE.TEMPERATURE": 0.07, "DKD.ALPHA": 1.0,
    "DKD.BETA": 8.0, "DKD.T": 4.0, "DKD.WARMUP": 20, "CAT_KD.IF_BINARIZE": False,
    "REVIEWKD.CE_WEIGHT": 1.0, "REVIEWKD.REVIEWKD_WEIGHT": 1.0, "REVIEWKD.WARMUP_EPOCHS": 20,
    "REVIEWKD.SHAPES": [1, 8, 16, 32], "REVIEWKD.OUT_SHAPES": [1, 8, 16, 32],
    "REVIEWKD.IN_CHANNELS": [64, 128, 256, 256], "REVIEWKD.OUT_CHANNELS": [64, 128, 256, 256],
    "REVIEWKD.MAX_MID_CHANNEL": 512, "REVIEWKD.STU_PREACT": False, "VID.EPS": 1e-5, "VID.INIT_PRED_VAR": 5.0,
    "VID.INPUT_SIZE": (32, 32), "VID.LOSS.FEAT_WEIGHT": 1.0, "PKT.LOSS.FEAT_WEIGHT": 30000.0,
    "SP.LOSS.FEAT_WEIGHT": 3000.0, "NST.LOSS.FEAT_WEIGHT": 50.0, "KDSVD.K": 1, "KDSVD.LOSS.FEAT_WEIGHT": 1.0,
}


def read(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_defaults_are_upstreams():
    cfg = load_cfg(None)
    assert {key: read(cfg, key) for key in UPSTREAM_DEFAULTS} == UPSTREAM_DEFAULTS


@pytest.mark.parametrize(
    "upstream_path,key,value",
    [
        ("configs/cifar100/dkd/res56_res20.yaml", "DKD.BETA", 2.0),
        ("configs/cifar100/crd.yaml", "SOLVER.TRAINER", "crd"),
        ("configs/cifar100/reviewkd.yaml", "REVIEWKD.REVIEWKD_WEIGHT", 5.0),
        ("configs/imagenet/r50_mv1/reviewkd.yaml", "REVIEWKD.OUT_CHANNELS", [256, 512, 1024, 2048, 2048]),
        ("CAT_KD/res32x4_shuv1.yaml", "CAT_KD.LOSS.CAT_loss_weight", 600.0),
        ("CAT_KD/res32x4_shuv1.yaml", "CAT_KD.LOSS.CAM_RESOLUTION", 4),
        ("CAT_KD/res32x4_shuv1.yaml", "CAT_KD.IF_NORMALIZE", True),
    ],
)
def test_upstream_method_values_reach_the_config(tmp_path, upstream_path, key, value):
    assert read(load_cfg(write_upstream(tmp_path, upstream_path)), key) == value


# The CAT-KD configs build on every CIFAR family; the class maps come from unmodified models.
@pytest.mark.parametrize("upstream_path", ["CAT_KD/res32x4_shuv2.yaml", "CAT_KD/wrn40_2_shuv1.yaml", "CAT_KD/vgg13_mv2.yaml"])
def test_cat_kd_upstream_configs_train_on_every_family(tmp_path, upstream_path):
    losses = one_step(load_cfg(write_upstream(tmp_path, upstream_path)), 32, 100)
    assert set(losses) == {"loss_CE", "loss_CAT"}


PAIRS = {
    "res56_res20": ("resnet56", "resnet20"),
    "res110_res32": ("resnet110", "resnet32"),
    "res32x4_res8x4": ("resnet32x4", "resnet8x4"),
    "wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2"),
    "wrn40_2_wrn40_1": ("wrn_40_2", "wrn_40_1"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
}
CIFAR_METHODS = {
    "kd": "KD", "at": "AT", "fitnet": "FITNET", "rkd": "RKD", "ofd": "OFD", "crd": "CRD", "dkd": "DKD", "cat_kd": "CAT_KD",
    "reviewkd": "REVIEWKD", "vid": "VID", "pkt": "PKT", "sp": "SP", "nst": "NST", "kdsvd": "KDSVD",
}
IMAGENET_METHODS = ["kd", "at", "ofd", "crd", "dkd", "cat_kd"]
DKD_BETA = {"res56_res20": 2.0, "res110_res32": 2.0, "res32x4_res8x4": 8.0,
            "wrn40_2_wrn16_2": 6.0, "wrn40_2_wrn40_1": 6.0, "vgg13_vgg8": 6.0}
# ReviewKD's per-pair settings: (IN_CHANNELS, OUT_CHANNELS, SHAPES = OUT_SHAPES)
REVIEW_SETTINGS = {
    "res56_res20": ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32]),
    "res110_res32": ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32]),
    "res32x4_res8x4": ([64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32]),
    "wrn40_2_wrn16_2": ([32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32]),
    "wrn40_2_wrn40_1": ([16, 32, 64, 64], [32, 64, 128, 128], [1, 8, 16, 32]),
    "vgg13_vgg8": ([128, 256, 512, 512, 512], [128, 256, 512, 512, 512], [1, 4, 4, 8, 16]),
}
CAT_WEIGHT = {"res56_res20": 0.7, "res110_res32": 1.8, "res32x4_res8x4": 15.0,
              "wrn40_2_wrn16_2": 12.0, "wrn40_2_wrn40_1": 1.5, "vgg13_vgg8": 4.5}


def shipped(dataset, method, name):
    return os.path.join(REPO_ROOT, "configs", dataset, method, f"{name}.yaml")


def test_every_method_and_pair_has_its_config_and_nothing_else():
    expected = {shipped("cifar100", m, p) for m in CIFAR_METHODS for p in PAIRS}
    expected |= {shipped("imagenet", m, "r34_r18") for m in IMAGENET_METHODS}
    expected |= {shipped("imagenet", "reviewkd", name) for name in REVIEWKD_IMAGENET_PAIRS}
    found = {
        f for m in CIFAR_METHODS for f in glob.glob(os.path.join(REPO_ROOT, "configs", "*", m, "*.yaml"))
    }
    assert found == expected


@pytest.mark.parametrize("method", sorted(CIFAR_METHODS))
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_cifar_config_recipe_and_values(method, pair):
    cfg = load_cfg(shipped("cifar100", method, pair))
    solver = cfg.SOLVER
    assert (cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == (CIFAR_METHODS[method], *PAIRS[pair])
    assert (solver.EPOCHS, solver.LR, solver.LR_DECAY_STAGES, solver.LR_DECAY_RATE) == (240, 0.05, [150, 180, 210], 0.1)
    assert (solver.WEIGHT_DECAY, solver.BATCH_SIZE, solver.TYPE, solver.MOMENTUM) == (0.0005, 64, "SGD", 0.9)
    assert cfg.EXPERIMENT.PROJECT == "cifar100_baselines"
    assert cfg.EXPERIMENT.TAG == f"{method},{PAIRS[pair][0]},{PAIRS[pair][1]}"
    assert (solver.TRAINER == "crd") == (method == "crd")
    if method == "dkd":
        assert (cfg.DKD.BETA, cfg.DKD.ALPHA, cfg.DKD.T, cfg.DKD.WARMUP) == (DKD_BETA[pair], 1.0, 4.0, 20)
    if method == "cat_kd":
        cat = cfg.CAT_KD
        assert (cat.LOSS.CAT_loss_weight, cat.LOSS.CAM_RESOLUTION, cat.LOSS.CE_WEIGHT) == (CAT_WEIGHT[pair], 2, 1.0)
        assert (cat.IF_NORMALIZE, cat.onlyCAT, cat.IF_BINARIZE) == (False, False, False)
    if method == "reviewkd":
        review = cfg.REVIEWKD
        in_channels, out_channels, shapes = REVIEW_SETTINGS[pair]
        assert (review.IN_CHANNELS, review.OUT_CHANNELS, review.SHAPES, review.OUT_SHAPES) == (
            in_channels, out_channels, shapes, shapes)
        assert (review.REVIEWKD_WEIGHT, review.WARMUP_EPOCHS, review.STU_PREACT) == (5.0, 20, False)
    if method == "vid":
        assert cfg.VID.INPUT_SIZE == (32, 32)


@pytest.mark.parametrize("method", sorted(CIFAR_METHODS))
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_cifar_config_trains_one_step(method, pair):
    cfg = load_cfg(shipped("cifar100", method, pair), ["CRD.NCE.K", 4])
    losses = one_step(cfg, 32, 100)
    assert set(losses) == ({"loss_CE", "loss_CAT"} if method == "cat_kd" else {"loss_ce", "loss_kd"})


IMAGENET_VALUES = {
    "kd": ("KD.TEMPERATURE", 1, 512, 0.2),
    "at": ("AT.LOSS.FEAT_WEIGHT", 1000.0, 512, 0.2),
    "ofd": ("OFD.LOSS.FEAT_WEIGHT", 0.0001, 256, 0.1),
    "crd": ("CRD.FEAT.STUDENT_DIM", 512, 256, 0.1),
    "dkd": ("DKD.BETA", 0.5, 512, 0.2),
    "cat_kd": ("CAT_KD.LOSS.CAT_loss_weight", 0.5, 512, 0.2),
}


@pytest.mark.parametrize("method", IMAGENET_METHODS)
def test_imagenet_config_values_and_one_step_at_64px(method):
    cfg = load_cfg(shipped("imagenet", method, "r34_r18"), ["CRD.NCE.K", 4])
    key, value, batch_size, lr = IMAGENET_VALUES[method]
    assert (read(cfg, key), cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.LR) == (value, batch_size, lr)
    assert (cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == ("imagenet", "ResNet34", "ResNet18")
    assert (cfg.SOLVER.EPOCHS, cfg.SOLVER.LR_DECAY_STAGES, cfg.SOLVER.WEIGHT_DECAY) == (100, [30, 60, 90], 0.0001)
    if method == "cat_kd":
        assert (cfg.CAT_KD.LOSS.CAM_RESOLUTION, cfg.CAT_KD.IF_NORMALIZE) == (4, False)
    one_step(cfg, 64, 1000)


REVIEWKD_IMAGENET_PAIRS = {
    "r34_r18": ("ResNet34", "ResNet18", 1.0, [64, 128, 256, 512, 512]),
    "r50_mv1": ("ResNet50", "MobileNetV1", 8.0, [256, 512, 1024, 2048, 2048]),
}


@pytest.mark.parametrize("name", sorted(REVIEWKD_IMAGENET_PAIRS))
def test_imagenet_reviewkd_configs_and_one_step_at_224px(name):
    cfg = load_cfg(shipped("imagenet", "reviewkd", name))
    teacher, student, weight, out_channels = REVIEWKD_IMAGENET_PAIRS[name]
    assert (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT, cfg.REVIEWKD.REVIEWKD_WEIGHT) == (teacher, student, weight)
    assert (cfg.REVIEWKD.OUT_CHANNELS, cfg.REVIEWKD.WARMUP_EPOCHS, cfg.REVIEWKD.STU_PREACT) == (out_channels, 1, True)
    assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.LR, cfg.SOLVER.EPOCHS) == (256, 0.1, 100)
    one_step(cfg, 224, 1000)  # the shapes are 224 px ones: checked against a 224 px probe at build


@pytest.mark.parametrize("name", ["reviewkd", "vid", "pkt", "sp", "nst", "kdsvd"])
def test_upstream_cifar_configs_of_the_feature_baselines_train_one_step(tmp_path, name):
    losses = one_step(load_cfg(write_upstream(tmp_path, f"configs/cifar100/{name}.yaml")), 32, 100)
    assert set(losses) == {"loss_ce", "loss_kd"}


def test_upstream_r50_mv1_reviewkd_builds_with_its_unread_mid_channel_setting(tmp_path):
    cfg = load_cfg(write_upstream(tmp_path, "configs/imagenet/r50_mv1/reviewkd.yaml"))
    models = [imagenet_model_dict[name](pretrained=False) for name in ("MobileNetV1", "ResNet50")]
    with pytest.warns(UserWarning, match="REVIEWKD.MAX_MID_CHANNEL 256 is ignored, as upstream does"):
        distiller = distiller_dict["REVIEWKD"](*models, cfg)
    assert all(abf.conv1[0].out_channels == 512 for abf in distiller.abfs)  # upstream's width
