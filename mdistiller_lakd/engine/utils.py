"""Small helpers of the training engine: meters, accuracy, learning-rate schedules, seeding, RNG state,
mixed precision."""
from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from yacs.config import CfgNode

from .cfg import ConfigError
from .metrics import CMIAccumulator

# Overrides that say where files live or how fast data loads stay out of the experiment name: a
# path in it would nest folders (the teacher's architecture is in the name already).
_NAME_NEUTRAL_KEYS = {
    "LOG.PREFIX", "DATASET.ROOT", "DATASET.NUM_WORKERS", "DATASET.DOWNLOAD", "DISTILLER.TEACHER_CKPT",
    "DISTILLER.TEACHER_URL", "MCMI.INIT_CKPT",
}
# The longest file name ext4, XFS, btrfs, APFS and NTFS accept (bytes; 255 UTF-16 units on NTFS).
MAX_NAME_BYTES = 255
_HASH_CHARS = 12

AMP_DTYPES = {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # SOLVER.AMP -> autocast dtype


class AverageMeter:
    """Running average of a value weighted by batch size."""

    def __init__(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Top-k accuracies in percent, as Python floats."""
    with torch.no_grad():
        maxk = min(max(topk), logits.size(1))
        ranked = logits.topk(maxk, dim=1).indices
        hits = ranked.eq(target.unsqueeze(1))
        return [hits[:, :k].any(dim=1).float().mean().item() * 100.0 for k in topk]


def log_msg(msg: str, mode: str = "INFO") -> str:
    """``[MODE] msg`` coloured as upstream's console output (INFO cyan, TRAIN green, EVAL red)."""
    color = {"INFO": 36, "TRAIN": 32, "EVAL": 31}[mode]
    return f"\033[{color}m[{mode}] {msg}\033[0m"


def experiment_name(cfg: CfgNode, opts: Sequence[str] = ()) -> str:
    """``PROJECT/NAME`` (or ``PROJECT/TAG`` when NAME is empty) followed by ``KEY:VALUE`` of the
    command-line overrides, joined by commas, as upstream's ``tools/train.py`` names its folders;
    shortened by ``fit_file_name`` when that passes the file system's limit (the run's
    ``config.yaml`` keeps every override)."""
    name = cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG
    tags = [f"{key}:{value}" for key, value in zip(opts[::2], opts[1::2]) if key not in _NAME_NEUTRAL_KEYS]
    return os.path.join(cfg.EXPERIMENT.PROJECT, fit_file_name(name + ",".join(tags)))


def fit_file_name(name: str) -> str:
    """``name`` when it fits in ``MAX_NAME_BYTES``; else its start and a hash of all of it
    (``<start>,<12 hex digits>``), so that names differing anywhere stay different folders."""
    encoded = name.encode()
    if len(encoded) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:_HASH_CHARS]
    # errors="ignore" drops a multi-byte character the cut went through.
    start = encoded[: MAX_NAME_BYTES - _HASH_CHARS - 1].decode(errors="ignore")
    return f"{start},{digest}"


def learning_rate(cfg: CfgNode, epoch: int) -> float:
    """The learning rate of (1-based) ``epoch`` under ``SOLVER.SCHEDULER``.

    ``step``: upstream's rule, ``LR * LR_DECAY_RATE ** #{stages s : epoch > s}``.
    ``linear`` / ``cosine``: the value at the start of the epoch of a curve that falls from ``LR``
    at the start of epoch 1 to 0 at the end of the last epoch.
    """
    solver = cfg.SOLVER
    if solver.SCHEDULER == "step":
        return solver.LR * solver.LR_DECAY_RATE ** sum(epoch > stage for stage in solver.LR_DECAY_STAGES)
    progress = (epoch - 1) / solver.EPOCHS
    if solver.SCHEDULER == "linear":
        return solver.LR * (1.0 - progress)
    if solver.SCHEDULER == "cosine":
        return solver.LR * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"SOLVER.SCHEDULER: unknown schedule '{solver.SCHEDULER}' (step | linear | cosine)")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices); a negative seed leaves them unseeded."""
    if seed < 0:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Every random generator a run draws from, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``get_rng_state`` saved; CUDA states only when the same GPUs are present."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype SOLVER.AMP names (None: full precision); ``ConfigError`` for an unknown
    mode or one that this device and torch build cannot run."""
    if mode not in AMP_DTYPES:
        raise ConfigError(f"SOLVER.AMP: unknown mode '{mode}'; use \"\" (off), \"bf16\" or \"fp16\"")
    dtype = AMP_DTYPES[mode]
    if dtype is None:
        return None
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("SOLVER.AMP: this GPU does not support bfloat16; use \"fp16\"")
    # torch.autocast warns and disables itself for a dtype the device does not support.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device.type, dtype=dtype):
            pass
    if caught:
        raise ConfigError(
            f"SOLVER.AMP: \"{mode}\" is not supported on {device.type} by torch {torch.__version__} "
            f"({caught[0].message}); use \"bf16\" or \"\""
        )
    return dtype


class Evaluation(NamedTuple):
    top1: float
    top5: float
    loss: float
    predictions: torch.Tensor  # top-1 class per validation image, on the CPU
    targets: torch.Tensor
    cmi: float  # conditional mutual information of the softmax outputs (metrics.CMIAccumulator)


def validate(
    val_loader,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    desc: str = "",
    progress: bool = True,
) -> Evaluation:
    """Top-1, top-5 and cross-entropy of ``logits_of(image)`` over ``val_loader`` (the caller puts
    the model in eval mode), and their CMI; also returns every prediction, in loader order.
    ``progress`` shows a progress bar."""
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    cmi = CMIAccumulator()
    predictions, targets = [], []
    bar = tqdm(val_loader, total=len(val_loader), leave=False, disable=not progress)
    with torch.no_grad():
        for image, target in bar:
            image = image.float().to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            logits = logits_of(image)
            acc1, acc5 = accuracy(logits, target, topk=(1, 5))
            batch_size = image.size(0)
            losses.update(F.cross_entropy(logits, target).item(), batch_size)
            top1.update(acc1, batch_size)
            top5.update(acc5, batch_size)
            cmi.update(logits, target)
            predictions.append(logits.argmax(dim=1).cpu())
            targets.append(target.cpu())
            bar.set_description(log_msg(f"{desc}Top-1:{top1.avg:.3f}| Top-5:{top5.avg:.3f}", "EVAL"))
    return Evaluation(top1.avg, top5.avg, losses.avg, torch.cat(predictions), torch.cat(targets), cmi.compute())

