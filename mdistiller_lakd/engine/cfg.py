"""The experiment configuration: upstream mdistiller's yacs tree, CAT-KD's extra keys, and ours.

Every key of upstream mdistiller's ``CFG`` keeps its name and default so that upstream config files
load unmodified (``LOG.WANDB`` is the one default we change: off unless asked for). CAT-KD's keys
(``CAT_KD``, ``if_test``, ``device`` ...) are accepted so that its released configs load too; the ones
that only steer CAT-KD's model surgery are read and ignored.
"""
from __future__ import annotations

import os
from typing import Sequence

from yacs.config import CfgNode as CN


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


CFG = CN()

# CAT-KD's top-level keys. `if_test` and `device` select its "_test" models and its GPU; here class
# maps come from the unmodified model and the device is chosen automatically, so both are inert.
CFG.device = 0
CFG.if_test = False
CFG.if_Augment = False
CFG.if_useFactor = False
CFG.if_self_train = False

# Experiment
CFG.EXPERIMENT = CN()
CFG.EXPERIMENT.PROJECT = "distill"
CFG.EXPERIMENT.NAME = ""
CFG.EXPERIMENT.TAG = "default"
CFG.EXPERIMENT.SEED = 0  # ours: seeds python, numpy and torch; -1 leaves them unseeded

# Dataset
CFG.DATASET = CN()
CFG.DATASET.TYPE = "cifar100"  # cifar100 | cifar10 | imagenet
CFG.DATASET.NUM_WORKERS = 2
CFG.DATASET.ROOT = "./data"  # ours: where the dataset files live
CFG.DATASET.DOWNLOAD = True  # ours: fetch CIFAR with torchvision when missing (as upstream)
CFG.DATASET.PIPELINE = "torchvision"  # ours: "torchvision" (per-image PIL) | "tensor" (batched)
CFG.DATASET.TEST = CN()
CFG.DATASET.TEST.BATCH_SIZE = 64
# CAT-KD's dataset-reduction experiment keys
CFG.DATASET.REDUCTION = False
CFG.DATASET.RESERVED_RATE = 1.0
CFG.DATASET.RESERVED_CLASS_NUM = 100

# Distiller
CFG.DISTILLER = CN()
CFG.DISTILLER.TYPE = "NONE"  # Vanilla as default
CFG.DISTILLER.TEACHER = "ResNet50"
CFG.DISTILLER.STUDENT = "resnet32"
CFG.DISTILLER.TEACHER_CKPT = ""  # ours: "" = upstream's download_ckpts/cifar_teachers/<name>_vanilla/

# Solver
CFG.SOLVER = CN()
CFG.SOLVER.TRAINER = "base"
CFG.SOLVER.BATCH_SIZE = 64
CFG.SOLVER.EPOCHS = 240
CFG.SOLVER.LR = 0.05
CFG.SOLVER.LR_DECAY_STAGES = [150, 180, 210]
CFG.SOLVER.LR_DECAY_RATE = 0.1
CFG.SOLVER.WEIGHT_DECAY = 0.0001
CFG.SOLVER.MOMENTUM = 0.9
CFG.SOLVER.TYPE = "SGD"
CFG.SOLVER.NESTEROV = False  # ours
CFG.SOLVER.SCHEDULER = "step"  # ours: step (LR_DECAY_STAGES) | linear | cosine
CFG.SOLVER.AMP = ""  # ours: "" | "bf16" | "fp16"
CFG.SOLVER.CHANNELS_LAST = False  # ours
CFG.SOLVER.SYNC_BN = False  # ours: SyncBatchNorm under torchrun
CFG.SOLVER.DOT = CN()
CFG.SOLVER.DOT.DELTA = 0.075

# Log
CFG.LOG = CN()
CFG.LOG.TENSORBOARD_FREQ = 500
CFG.LOG.SAVE_CHECKPOINT_FREQ = 40
CFG.LOG.PREFIX = "./output"
CFG.LOG.WANDB = False  # upstream: True; ours is off unless asked for

# Distillation methods

CFG.KD = CN()
CFG.KD.TEMPERATURE = 4
CFG.KD.LOSS = CN()
CFG.KD.LOSS.CE_WEIGHT = 0.1
CFG.KD.LOSS.KD_WEIGHT = 0.9

CFG.AT = CN()
CFG.AT.P = 2
CFG.AT.LOSS = CN()
CFG.AT.LOSS.CE_WEIGHT = 1.0
CFG.AT.LOSS.FEAT_WEIGHT = 1000.0

CFG.RKD = CN()
CFG.RKD.DISTANCE_WEIGHT = 25
CFG.RKD.ANGLE_WEIGHT = 50
CFG.RKD.LOSS = CN()
CFG.RKD.LOSS.CE_WEIGHT = 1.0
CFG.RKD.LOSS.FEAT_WEIGHT = 1.0
CFG.RKD.PDIST = CN()
CFG.RKD.PDIST.EPSILON = 1e-12
CFG.RKD.PDIST.SQUARED = False

CFG.FITNET = CN()
CFG.FITNET.HINT_LAYER = 2  # (0, 1, 2, 3, 4)
CFG.FITNET.INPUT_SIZE = (32, 32)
CFG.FITNET.LOSS = CN()
CFG.FITNET.LOSS.CE_WEIGHT = 1.0
CFG.FITNET.LOSS.FEAT_WEIGHT = 100.0

CFG.KDSVD = CN()
CFG.KDSVD.K = 1
CFG.KDSVD.LOSS = CN()
CFG.KDSVD.LOSS.CE_WEIGHT = 1.0
CFG.KDSVD.LOSS.FEAT_WEIGHT = 1.0

CFG.OFD = CN()
CFG.OFD.LOSS = CN()
CFG.OFD.LOSS.CE_WEIGHT = 1.0
CFG.OFD.LOSS.FEAT_WEIGHT = 0.001
CFG.OFD.CONNECTOR = CN()
CFG.OFD.CONNECTOR.KERNEL_SIZE = 1

CFG.NST = CN()
CFG.NST.LOSS = CN()
CFG.NST.LOSS.CE_WEIGHT = 1.0
CFG.NST.LOSS.FEAT_WEIGHT = 50.0

CFG.PKT = CN()
CFG.PKT.LOSS = CN()
CFG.PKT.LOSS.CE_WEIGHT = 1.0
CFG.PKT.LOSS.FEAT_WEIGHT = 30000.0

CFG.SP = CN()
CFG.SP.LOSS = CN()
CFG.SP.LOSS.CE_WEIGHT = 1.0
CFG.SP.LOSS.FEAT_WEIGHT = 3000.0

CFG.VID = CN()
CFG.VID.LOSS = CN()
CFG.VID.LOSS.CE_WEIGHT = 1.0
CFG.VID.LOSS.FEAT_WEIGHT = 1.0
CFG.VID.EPS = 1e-5
CFG.VID.INIT_PRED_VAR = 5.0
CFG.VID.INPUT_SIZE = (32, 32)

CFG.CRD = CN()
CFG.CRD.MODE = "exact"  # ("exact", "relax")
CFG.CRD.FEAT = CN()
CFG.CRD.FEAT.DIM = 128
CFG.CRD.FEAT.STUDENT_DIM = 256
CFG.CRD.FEAT.TEACHER_DIM = 256
CFG.CRD.LOSS = CN()
CFG.CRD.LOSS.CE_WEIGHT = 1.0
CFG.CRD.LOSS.FEAT_WEIGHT = 0.8
CFG.CRD.NCE = CN()
CFG.CRD.NCE.K = 16384
CFG.CRD.NCE.MOMENTUM = 0.5
CFG.CRD.NCE.TEMPERATURE = 0.07

CFG.REVIEWKD = CN()
CFG.REVIEWKD.CE_WEIGHT = 1.0
CFG.REVIEWKD.REVIEWKD_WEIGHT = 1.0
CFG.REVIEWKD.WARMUP_EPOCHS = 20
CFG.REVIEWKD.SHAPES = [1, 8, 16, 32]
CFG.REVIEWKD.OUT_SHAPES = [1, 8, 16, 32]
CFG.REVIEWKD.IN_CHANNELS = [64, 128, 256, 256]
CFG.REVIEWKD.OUT_CHANNELS = [64, 128, 256, 256]
CFG.REVIEWKD.MAX_MID_CHANNEL = 512
CFG.REVIEWKD.STU_PREACT = False

CFG.DKD = CN()
CFG.DKD.CE_WEIGHT = 1.0
CFG.DKD.ALPHA = 1.0
CFG.DKD.BETA = 8.0
CFG.DKD.T = 4.0
CFG.DKD.WARMUP = 20
# CAT-KD's DKD keys (its DKD configs carry them)
CFG.DKD.if_vanilla = True
CFG.DKD.test_weight = 200.0

# CAT-KD: class attention transfer
CFG.CAT_KD = CN()
CFG.CAT_KD.IF_NORMALIZE = True
CFG.CAT_KD.onlyCAT = False
CFG.CAT_KD.IF_BINARIZE = False
CFG.CAT_KD.IF_OnlyTransferPartialCAMs = False
CFG.CAT_KD.CAMs_Nums = 100
CFG.CAT_KD.Strategy = 0
CFG.CAT_KD.LOSS = CN()
CFG.CAT_KD.LOSS.CE_WEIGHT = 1.0
CFG.CAT_KD.LOSS.CAT_loss_weight = 400.0
CFG.CAT_KD.LOSS.CAM_RESOLUTION = 2
CFG.CAT_KD.teacher_dir = None
CFG.CAT_KD.student_dir = None

# NKD: normalized KD (cls_KD's CIFAR-100 NKDLoss settings; its ImageNet configs use 1.0 / 1.5)
CFG.NKD = CN()
CFG.NKD.TEMPERATURE = 3.0  # T of the non-target term; the target term is at T = 1
CFG.NKD.GAMMA = 3.5
CFG.NKD.LOSS = CN()
CFG.NKD.LOSS.CE_WEIGHT = 1.0
CFG.NKD.LOSS.NKD_WEIGHT = 1.0  # ours: scales the whole NKD term

# USKD: universal self-KD, teacherless (cls_KD's CIFAR-100 USKDLoss; ImageNet: 1.0 / 0.1 / 0.005)
CFG.USKD = CN()
CFG.USKD.ALPHA = 0.1
CFG.USKD.BETA = 0.1
CFG.USKD.MU = 0.1
CFG.USKD.FEAT_INDEX = None  # index into feats["feats"] of the weak head's map; None = automatic
CFG.USKD.LOSS = CN()
CFG.USKD.LOSS.CE_WEIGHT = 1.0

# PS-KD: progressive self-KD, teacherless (the schedule runs over SOLVER.EPOCHS)
CFG.PSKD = CN()
CFG.PSKD.ALPHA_T = 0.8

# LAKD: local attention knowledge distillation (docs: ../shared/docs/METHOD.md, "Config node")
CFG.LAKD = CN()
CFG.LAKD.LOCATIONS = [1, 4, 9]  # 1-based block indices; the last must be the student's last block
CFG.LAKD.TEACHER_STAGES = []  # [] = resolution-matched; else indices into the teacher's feats list
CFG.LAKD.DETACH = True
CFG.LAKD.BACKWARD = "eager"  # "eager" | "joint"
CFG.LAKD.NDAM = CN()
CFG.LAKD.NDAM.ENABLE = True
CFG.LAKD.NDAM.ABS = True
CFG.LAKD.NDAM.AVG_WEIGHT = 0.3
CFG.LAKD.NDAM.MAX_WEIGHT = 0.7
CFG.LAKD.LOSS = CN()
CFG.LAKD.LOSS.CE_WEIGHT = 1.0
CFG.LAKD.LOSS.CAT_WEIGHT = 0.7
CFG.LAKD.LOSS.FEAT_WEIGHT = 100.0
CFG.LAKD.LOSS.FINAL_FEAT_WEIGHT = 0.0
CFG.LAKD.LOSS.CAM_RESOLUTION = 2
CFG.LAKD.LOSS.IF_NORMALIZE = False


def _key_of(error: Exception) -> str:
    """The config key a yacs error is about (yacs puts it after the last ':')."""
    message = str(error.args[0]) if error.args else str(error)
    return message.rsplit(":", 1)[-1].strip()


def load_cfg(path: str | None = None, opts: Sequence[str] = ()) -> CN:
    """A fresh copy of ``CFG`` merged with the YAML file at ``path`` and ``KEY VALUE`` overrides.

    Raises ``ConfigError`` naming the file (or the command line) and the key when a key is unknown
    or a value has the wrong type; the returned config is frozen.
    """
    cfg = CFG.clone()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        if not path.endswith((".yaml", ".yml")):
            raise ConfigError(f"{path}: config files are YAML (.yaml or .yml)")
        try:
            cfg.merge_from_file(path)
        except KeyError as error:
            raise ConfigError(f"{path}: unknown config key '{_key_of(error)}'") from None
        except ValueError as error:
            raise ConfigError(f"{path}: {error}") from None
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"overrides come as KEY VALUE pairs; got an odd list: {list(opts)}")
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, AssertionError) as error:
            raise ConfigError(f"command-line override: unknown config key '{_key_of(error)}'") from None
        except ValueError as error:
            raise ConfigError(f"command-line override: {error}") from None
    cfg.freeze()
    return cfg


def dump_cfg(cfg: CN) -> str:
    """The sections a run depends on, as YAML: the common nodes and the active method's node."""
    shown = CN()
    for key in ("EXPERIMENT", "DATASET", "DISTILLER", "SOLVER", "LOG"):
        shown[key] = cfg[key]
    method = cfg.DISTILLER.TYPE
    if method in cfg:
        shown[method] = cfg[method]
    return shown.dump()
