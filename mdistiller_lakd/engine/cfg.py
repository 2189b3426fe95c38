"""The experiment configuration: upstream mdistiller's yacs tree, CAT-KD's extra keys, and ours.

Every key of upstream mdistiller's ``CFG`` keeps its name and default so that upstream config files
load unmodified (``LOG.WANDB`` is the one default we change: off unless asked for). CAT-KD's keys
(``CAT_KD``, ``if_test``, ``device`` ...) are accepted so that its released configs load too; the ones
that only steer CAT-KD's model surgery are read and ignored.
"""
from __future__ import annotations

import os
import warnings
from ast import literal_eval
from typing import Callable, Sequence

import yaml
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
CFG.DATASET.TYPE = "cifar100"  # cifar100 | cifar10 | tiny_imagenet | imagenet
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
# ours: where a missing CIFAR-100 teacher of upstream's release is downloaded from; "" = never
CFG.DISTILLER.TEACHER_URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"

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
CFG.SOLVER.CHECKPOINT_MINUTES = 0  # ours: a mid-epoch `latest` every N minutes; 0 = off (docs/preemption.md)
CFG.SOLVER.COMPILE = False  # ours: False | True | "default" | "reduce-overhead" | "max-autotune" (docs/compile.md)
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
CFG.VID.LEARN_VARIANCE = False  # ours: train the log-scales (the paper); upstream keeps them fixed

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

# LAKD: local attention knowledge distillation (docs/METHOD.md, "Config keys")
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

# MCMI: fine-tune a trained teacher for high conditional mutual information (Ye et al., ICLR 2024)
CFG.MCMI = CN()
CFG.MCMI.INIT_CKPT = ""  # weights to fine-tune; "" = the released teacher of DISTILLER.STUDENT (cifar100)
CFG.MCMI.LOSS = CN()
CFG.MCMI.LOSS.CE_WEIGHT = 1.0
CFG.MCMI.LOSS.CMI_WEIGHT = 0.15  # λ ≥ 0: the reference's `--param 1 -0.15` is 0.15
CFG.MCMI.UPDATE_CENTROIDS = False  # per-step EMA of the centroids (switched off in the reference)
CFG.MCMI.CENTROID_DECAY = 0.9999  # weight of the old centroid in the EMA
CFG.MCMI.SAMPLES_PER_CLASS = 8  # pool images per class in each EMA step
CFG.MCMI.POOL_PER_CLASS = 500  # training images per class in the pool
# HARD: learned hard augmentations (our variant; docs/methods.md, "HARD")
CFG.HARD = CN()
CFG.HARD.TEMPERATURE = 4.0
CFG.HARD.LOSS = CN()
CFG.HARD.LOSS.CE_WEIGHT = 0.1
CFG.HARD.LOSS.KD_WEIGHT = 0.9
CFG.HARD.LOSS.AUG_KD_WEIGHT = 0.9
CFG.HARD.AUG = CN()
CFG.HARD.AUG.TYPE = "affine_color"  # "affine" | "affine_color"
CFG.HARD.AUG.COMPONENTS = 1  # mixture components
CFG.HARD.AUG.TRANSLATE_MAX = 0.25  # normalised coordinates: 0.25 is 4 pixels on 32 x 32
CFG.HARD.AUG.LINEAR_MAX = 0.25  # the affine matrix's linear part minus the identity; < 1
CFG.HARD.AUG.GAIN_MAX = 0.2  # per-channel gain
CFG.HARD.AUG.BIAS_MAX = 0.2  # per-channel bias, in normalised units
CFG.HARD.AUG.INIT_SIGMA = 0.1
CFG.HARD.AUG.PADDING = "zeros"  # grid_sample's padding_mode
CFG.HARD.AUG.LR = 0.001  # the augmentor's Adam
CFG.HARD.AUG.UPDATE_EVERY = 1  # an augmentor step every N student steps
CFG.HARD.AUG.TEACHER_REG = 1.0  # beta, weight of the teacher-consistency term
CFG.HARD.AUG.VIS_NUM = 16  # images in the per-epoch grid
# ACAM-KD: cross-attention fusion and adaptive spatial-channel masks (docs/ACAM_KD.md)
CFG.ACAM_KD = CN()
CFG.ACAM_KD.STAGES = [-1]  # indices into the student's feats; default the last stage
CFG.ACAM_KD.TEACHER_STAGES = []  # [] = resolution-matched (deepest teacher stage of the same H x W)
CFG.ACAM_KD.NUM_MASKS = 6  # M >= 1: spatial masks and channel masks each
CFG.ACAM_KD.QK_RATIO = 0.5  # in (0, 1]: C_q = max(1, round(C_t * QK_RATIO))
CFG.ACAM_KD.MASK_GRAD = "detached"  # "detached" (ours, default) | "joint" (the paper read literally)
CFG.ACAM_KD.INPUT_SIZE = (32, 32)  # probe size for the feature shapes; ImageNet (224, 224)
CFG.ACAM_KD.LOSS = CN()
CFG.ACAM_KD.LOSS.CE_WEIGHT = 1.0
CFG.ACAM_KD.LOSS.FEAT_WEIGHT = 100.0  # alpha
CFG.ACAM_KD.LOSS.SPATIAL_WEIGHT = 1.0  # weight of L_s inside alpha (0: channel masks only)
CFG.ACAM_KD.LOSS.CHANNEL_WEIGHT = 1.0  # weight of L_c inside alpha (0: spatial masks only)
CFG.ACAM_KD.LOSS.DIV_WEIGHT = 1.0  # lambda


def _key_of(error: Exception) -> str:
    """The config key a yacs error is about (yacs puts it after the last ':')."""
    message = str(error.args[0]) if error.args else str(error)
    return message.rsplit(":", 1)[-1].strip()


def yaml_error_message(path: str, error: yaml.YAMLError) -> str:
    """``FILE, line N: not valid YAML: <what>``, with the line where the parser gave up."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}" if mark is not None else path
    problem = getattr(error, "problem", None) or str(error)
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        context += f" that starts at line {context_mark.line + 1}"
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def load_cfg(path: str | None = None, opts: Sequence[str] = ()) -> CN:
    """A fresh copy of ``CFG`` merged with the YAML file at ``path`` and ``KEY VALUE`` overrides.

    Raises ``ConfigError`` naming the file (or the command line) and the key when a key is unknown
    or a value has the wrong type; the returned config is frozen.
    """
    cfg = CFG.clone()
    for key in _BOOL_OR_NAME_KEYS:
        _set(cfg, key, None)
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
        except (TypeError, AttributeError):  # yacs on a file that is YAML but not a mapping of keys
            raise ConfigError(f"{path}: a config file is a mapping of KEY: value lines") from None
        except yaml.YAMLError as error:
            raise ConfigError(yaml_error_message(path, error)) from None
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"overrides come as KEY VALUE pairs; got an odd list: {list(opts)}")
        try:
            cfg.merge_from_list(_ints_as_floats(cfg, list(opts)))
        except (KeyError, AssertionError) as error:
            raise ConfigError(f"command-line override: unknown config key '{_key_of(error)}'") from None
        except ValueError as error:
            raise ConfigError(f"command-line override: {error}") from None
    for key, default in _BOOL_OR_NAME_KEYS.items():
        if _get(cfg, key) is None:
            _set(cfg, key, default)
    cfg.freeze()
    return cfg


def _ints_as_floats(cfg: CN, opts: list) -> list:
    """``KEY 1`` for a float key means 1.0 (yacs would reject the int): a weight of 0 or a learning
    rate of 1 typed as a whole number is not a type error to a user."""
    widened = list(opts)
    for i in range(0, len(widened), 2):
        node, *path = widened[i].split(".")
        default = cfg.get(node)
        for part in path:
            default = default.get(part) if isinstance(default, CN) else None
        if isinstance(default, float) and isinstance(widened[i + 1], str):
            try:
                value = literal_eval(widened[i + 1])
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                widened[i + 1] = repr(float(value))
    return widened


def dump_cfg(cfg: CN) -> str:
    """The sections a run depends on, as YAML: the common nodes and the active method's node."""
    shown = CN()
    for key in ("EXPERIMENT", "DATASET", "DISTILLER", "SOLVER", "LOG"):
        shown[key] = cfg[key]
    method = cfg.DISTILLER.TYPE
    if method in cfg:
        shown[method] = cfg[method]
    return shown.dump()


def _at_least(low: float) -> tuple[str, Callable[[float], bool]]:
    return f">= {low}", lambda value: value >= low


def _above(low: float) -> tuple[str, Callable[[float], bool]]:
    return f"> {low}", lambda value: value > low


# Numeric keys with an obvious valid range; keys ending in WEIGHT (any node) are checked too.
_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "SOLVER.EPOCHS": _at_least(1),
    "SOLVER.BATCH_SIZE": _at_least(1),
    "DATASET.TEST.BATCH_SIZE": _at_least(1),
    "DATASET.NUM_WORKERS": _at_least(0),
    "SOLVER.LR": _above(0),
    "SOLVER.LR_DECAY_RATE": _above(0),
    "SOLVER.WEIGHT_DECAY": _at_least(0),
    "SOLVER.MOMENTUM": ("in [0, 1)", lambda value: 0 <= value < 1),
    "LOG.SAVE_CHECKPOINT_FREQ": _at_least(1),
    "SOLVER.CHECKPOINT_MINUTES": _at_least(0),
    "KD.TEMPERATURE": _above(0),
    "DKD.T": _above(0),
    "REVIEWKD.WARMUP_EPOCHS": _above(0),
    "LAKD.LOSS.CAM_RESOLUTION": _at_least(1),
}
# Keys that take a bool or a name (SOLVER.COMPILE: False, True or a mode), with their defaults:
# yacs requires an override to have the default's type, so load_cfg merges them from None.
_BOOL_OR_NAME_KEYS = {"SOLVER.COMPILE": False}
_CHOICES = {
    "SOLVER.SCHEDULER": ("step", "linear", "cosine"),
    "LAKD.BACKWARD": ("eager", "joint"),
}


def _get(cfg: CN, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _set(cfg: CN, key: str, value) -> None:
    *path, name = key.split(".")
    for part in path:
        cfg = cfg[part]
    cfg[name] = value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _weight_keys(node: CN, prefix: str = "") -> list[tuple[str, object]]:
    """Every ``(full key, value)`` of the tree whose name ends in WEIGHT (``KD.LOSS.KD_WEIGHT``,
    ``CAT_KD.LOSS.CAT_loss_weight``, ...): loss weights, which must not be negative."""
    found = []
    for name, value in node.items():
        if isinstance(value, CN):
            found += _weight_keys(value, f"{prefix}{name}.")
        elif name.upper().endswith("WEIGHT"):
            found.append((prefix + name, value))
    return found


def _integers_in(values, low: int, increasing: bool = True) -> bool:
    """Whether ``values`` are integers >= ``low`` (strictly increasing when ``increasing``)."""
    values = list(values)
    in_range = all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)
    return in_range and not (increasing and any(a >= b for a, b in zip(values, values[1:])))


def _check_decay_stages(stages: list, epochs: int) -> None:
    """Stages must be strictly increasing whole epochs >= 1. A stage s lowers the LR from epoch
    s + 1 on, so one at or past the last epoch never acts: upstream trains such a config (a short
    trial of a 240-epoch recipe), and so do we, with a warning."""
    if not _integers_in(stages, 1):
        raise ConfigError(f"SOLVER.LR_DECAY_STAGES: must be strictly increasing whole epochs >= 1, got {stages}")
    idle = [stage for stage in stages if stage >= epochs]
    if idle:
        warnings.warn(
            f"SOLVER.LR_DECAY_STAGES: {idle} at or past the last epoch (SOLVER.EPOCHS {epochs}) never lower "
            "the learning rate", stacklevel=3,
        )


def check_values(cfg: CN) -> None:
    """Raise ``ConfigError`` naming the full key of the first value outside its valid range; warn
    about decay stages that never act.

    Run before any data is read, so that a bad value stops the run at once rather than as a
    DataLoader traceback or an empty "training"."""
    for key, (rule, valid) in _RANGES.items():
        value = _get(cfg, key)
        if not _is_number(value) or not valid(value):
            raise ConfigError(f"{key}: must be {rule}, got {value!r}")
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {_get(cfg, key)!r}")
    from .compile import compile_mode  # imports this module's ConfigError

    compile_mode(cfg.SOLVER.COMPILE)
    for key, value in _weight_keys(cfg):
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(_is_number(v) and v >= 0 for v in values):
            raise ConfigError(f"{key}: a weight must be a number >= 0, got {value!r}")
    solver = cfg.SOLVER
    if solver.SCHEDULER == "step":
        _check_decay_stages(list(solver.LR_DECAY_STAGES), solver.EPOCHS)
    lakd = cfg.LAKD
    if not lakd.LOCATIONS or not _integers_in(lakd.LOCATIONS, 1):
        raise ConfigError(
            f"LAKD.LOCATIONS: must be strictly increasing block numbers >= 1 (1-based, the last one "
            f"the student's last block), got {list(lakd.LOCATIONS)}"
        )
    if not _integers_in(lakd.TEACHER_STAGES, 0, increasing=False):
        raise ConfigError(
            f"LAKD.TEACHER_STAGES: must be indices >= 0 into the teacher's feats ([] = resolution-matched), "
            f"got {list(lakd.TEACHER_STAGES)}"
        )
