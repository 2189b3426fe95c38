"""Checkpoint files: atomic writes, safe reads, and model weights out of any checkpoint format we meet.

Formats read: upstream's released teachers (``{"model": state_dict, ...}``, sometimes with
DataParallel's ``module.`` prefix, and training metadata: see ``RELEASED_CHECKPOINT_GLOBALS``),
upstream's training checkpoints (``latest``/``best``: the whole distiller under
``module.student.*`` / ``module.teacher.*``), this project's student checkpoints (``student_*``) and
training checkpoints (``student.*`` / ``teacher.*``), and a bare state_dict.
"""
from __future__ import annotations

import argparse
import glob
import os
import pickle
from typing import BinaryIO, Callable

import numpy as np
import torch
import torch.nn as nn

_TEMP_SUFFIX = ".tmp"
_SHOWN_KEYS = 5  # how many offending keys an error message lists

try:
    from numpy._core.multiarray import scalar as _numpy_scalar  # numpy 2.x
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar

# The objects besides tensors and plain values that upstream's released teachers (ckpt_epoch_240.pth)
# hold: the training options as an argparse.Namespace and numpy scalars (the accuracy) with their
# dtypes. Harmless to rebuild, so they load with weights_only=True; nothing else does. The scalar
# reconstructor is named by the module of the numpy that pickled it (numpy.core in 1.x, numpy._core
# in 2.x); a dtype is rebuilt as numpy.dtype(...) and then set up as an instance of its dtype class.
RELEASED_CHECKPOINT_GLOBALS = [
    argparse.Namespace,
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    *dict.fromkeys(type(np.dtype(code)) for code in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: ``write`` fills a temporary file in the same folder, which then
    replaces ``path``; a reader (or a run killed mid-write) sees the old file or the new one."""
    folder, name = os.path.split(os.path.abspath(path))
    # Named after the process (one writer per file); created with the default permissions.
    temp_path = os.path.join(folder, f".{name}.{os.getpid()}{_TEMP_SUFFIX}")
    try:
        with open(temp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise


def save_checkpoint(obj: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(folder: str) -> None:
    """Delete the temporary files of writes that a killed run never finished."""
    for path in glob.glob(os.path.join(folder, f".*{_TEMP_SUFFIX}")):
        os.unlink(path)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint onto the CPU without executing pickled code: tensors, plain Python values
    and ``RELEASED_CHECKPOINT_GLOBALS`` load; anything else raises ``CheckpointError`` naming the
    file and the refused global."""
    with torch.serialization.safe_globals(RELEASED_CHECKPOINT_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            failure, refused = str(error), _refused_globals(path)
    if refused:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it holds {', '.join(refused)}, refused: only tensors, plain "
            "Python values and the metadata of upstream's released checkpoints load safely (loading other "
            "objects can run code). If you trust the file, save its weights again as a state_dict."
        )
    raise CheckpointError(
        f"cannot read checkpoint {path}: {failure}\n"
        "It is truncated, not a PyTorch checkpoint, or holds objects other than tensors and plain "
        "Python values (only those load safely)."
    )


def _refused_globals(path: str) -> list[str]:
    """The classes and functions named in the checkpoint at ``path`` that ``torch.load`` refuses
    (with the allowed ones in effect); none when the file cannot be read that far."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError, OSError):
        return []


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights of the (student) model inside any of the formats in the module docstring."""
    state = checkpoint.get("model", checkpoint)
    state = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}
    if any(key.startswith("student.") for key in state):
        state = {key[len("student."):]: value for key, value in state.items() if key.startswith("student.")}
    return state


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOWN_KEYS else ''})"


def load_weights(model: nn.Module, checkpoint: dict, source: str, arch: str) -> None:
    """Load the model weights inside ``checkpoint`` (read from ``source``) into ``model`` of
    architecture ``arch``; a checkpoint of another architecture raises ``CheckpointError`` naming
    the keys that differ."""
    state = model_state_dict(checkpoint)
    expected = model.state_dict()
    problems = []
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: {tuple(state[key].shape)} in the file, {tuple(value.shape)} in the model"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listed(mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit the model '{arch}':\n  " + "\n  ".join(problems)
            + "\nWas it trained as a different architecture or for another number of classes?"
        )
    model.load_state_dict(state)
