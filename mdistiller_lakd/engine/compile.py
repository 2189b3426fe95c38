"""``SOLVER.COMPILE``: ``torch.compile`` what a distiller allows, in place, with the same numbers.

``False`` (default) trains eagerly; ``True`` or a mode (``default``, ``reduce-overhead``,
``max-autotune``) compiles the functions of the distiller's ``compile_plan``: by default its whole
training forward (teacher, student and loss in one graph), for some methods only the models' or the
blocks' forwards (see each ``compile_plan``). Each function is replaced on its owner by its compiled
self, so no module is wrapped: ``state_dict`` keys, checkpoints, hooks on the owner and DDP are
unchanged. Shapes start static; the first batch of another size (the last partial batch, a
validation batch) recompiles once with a dynamic batch dimension that serves every later size.

Where no compiler is available (no C++ compiler for inductor on the CPU, no Triton on CUDA) the run
warns once and trains eagerly. ``compile_for_training`` returns the one-line report the trainer
writes to the worklog: what was compiled, what runs eagerly, and why.
"""
from __future__ import annotations

import os
import shutil
import warnings
from collections import Counter

import torch
import torch._functorch.config
import torch.nn as nn
from yacs.config import CfgNode

from .cfg import ConfigError

MODES = ("default", "reduce-overhead", "max-autotune")
# Compiles of one code object (BasicBlock.forward shared by LAKD's blocks: one per distinct block
# structure, then one dynamic-batch one each) before dynamo gives up on it; raised to fit the plan.
RECOMPILES_PER_TARGET = 4


def compile_mode(value) -> str | None:
    """The ``torch.compile`` mode of a ``SOLVER.COMPILE`` value; None for ``False``."""
    if value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in MODES:
        return value
    raise ConfigError(f"SOLVER.COMPILE: must be False, True or one of {', '.join(MODES)}, got {value!r}")


def missing_compiler(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    if any(shutil.which(compiler) for compiler in compilers):
        return None
    return f"no C++ compiler found ({' or '.join(compilers)})"


def compile_for_training(
    distiller: nn.Module, cfg: CfgNode, device: torch.device, retains_graph: bool = False
) -> str:
    """Compile in place what ``distiller.compile_plan()`` names, under ``SOLVER.COMPILE``'s mode.
    ``retains_graph``: the training step back-propagates through one graph twice (DOT).

    Returns the worklog's report line; "" when SOLVER.COMPILE is False (nothing is logged then)."""
    mode = compile_mode(cfg.SOLVER.COMPILE)
    if mode is None:
        return ""
    reason = missing_compiler(device)
    if reason is not None:
        warnings.warn(f"SOLVER.COMPILE {cfg.SOLVER.COMPILE}: {reason}; training eagerly")
        return f"nothing compiled ({reason}); training eagerly"
    if retains_graph:
        # A compiled backward frees ("donates") its saved buffers, which a second backward through
        # the same graph still needs; off for the whole process, as the step runs every iteration.
        torch._functorch.config.donated_buffer = False
        # Measured (torch 2.14, KD with DOT): a whole compiled training forward back-propagated
        # twice gives the early layers wrong gradients; the models compiled alone give exact ones.
        targets, eager = distiller.models_only_plan("SOLVER.TRAINER back-propagates twice")
    else:
        targets, eager = distiller.compile_plan()
    for target in targets:
        setattr(target.owner, target.attribute, torch.compile(getattr(target.owner, target.attribute), mode=mode))
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILES_PER_TARGET * len(targets))
    counts = Counter(target.name for target in targets)
    compiled = ", ".join(name if count == 1 else f"{name} x{count}" for name, count in counts.items())
    return f"compiled ({mode}): {compiled or 'nothing'}; eager: {eager or 'nothing'}"
