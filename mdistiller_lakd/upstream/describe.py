"""The words of the pull request: its commit message and its description."""
from __future__ import annotations

from .edits import PAPER_URL, paper_table

TITLE = "Add LAKD (Local Attention Knowledge Distillation)"

# Why each upstream file changes, in the description's table.
WHY = {
    "mdistiller/distillers/LAKD.py": "the distiller (new)",
    "mdistiller/lakd/": "its mechanics, torch only (new): block lists per model family (`blocks.py`), "
                        "the local modules and their hooks (`sdm.py`), NDAM (`ndam.py`), class maps "
                        "from an unmodified model and the CAT loss (`cam.py`)",
    "configs/cifar100/lakd/": "the six CIFAR-100 pairs of the README's table, with this repo's 240-epoch "
                              "recipe (new)",
    "mdistiller/distillers/__init__.py": "inserted: the import and the `distiller_dict` entry",
    "mdistiller/engine/cfg.py": "inserted: the `CFG.LAKD` node (`show_cfg` prints it for LAKD runs)",
    "mdistiller/engine/trainer.py": "inserted: a distiller that has `student_checkpoint_extras()` adds "
                                    "them to the `student_*` checkpoints. NDAM is part of a LAKD student's "
                                    "forward; the weights alone are a different, worse network. Other "
                                    "distillers lack the method, so their checkpoints are unchanged",
    "tools/eval.py": "inserted: NDAM re-attached when the checkpoint records it (`\"ndam\"`), so that "
                     "a LAKD student is evaluated as it was trained",
    "README.md": "inserted: LAKD's row in the methods table, how to train it, the paper's numbers",
}

# The check against upstream, measured once by hand (mdistiller-lakd's docs/UPSTREAM.md, "Checked").
MEASURED = (
    "**Measured** on upstream commit a08d46f, CPU, in a process where only that tree was importable "
    "(`.cuda()` patched away in the check script, not here): three iterations of `BaseTrainer.train_iter` "
    "on upstream's resnet56 -> resnet20 from `configs/cifar100/lakd/res56_res20.yaml` give the same "
    "losses, gradients and weights as mdistiller-lakd's LAKD on the same weights and batches (largest "
    "difference 0.0); after `train_epoch`, `student_latest` holds `ndam` and `tools/eval.py` reproduces "
    "the trained distiller's logits exactly (largest difference 0.0), where the weights alone do not."
)


def commit_message(files: list[str]) -> str:
    body = "\n".join(f"- {path}" for path in files)
    return (
        f"{TITLE}\n\n"
        f"LAKD ({PAPER_URL}) as DISTILLER.TYPE LAKD: the distiller, its mechanics in\n"
        "mdistiller/lakd/, the CFG.LAKD node, configs for six CIFAR-100 pairs, and NDAM kept with\n"
        "student checkpoints and restored by tools/eval.py.\n\n"
        f"Files:\n{body}\n"
    )


def description(diff_stat: str, base: str) -> str:
    """The pull request's description, in Markdown."""
    changes = "\n".join(f"| `{path}` | {why} |" for path, why in WHY.items())
    return f"""# {TITLE}

## What

[LAKD]({PAPER_URL}) (Zhang et al., "LAKD: Activation Mapping Distillation Based on Local Learning")
as `DISTILLER.TYPE: LAKD`, with configs for the six CIFAR-100 teacher-student pairs of the README's
main table.

The student is cut after chosen blocks (`LAKD.LOCATIONS`, 1-based) into local modules. Each module
but the last learns only from a feature loss against the teacher (MSE, through a resize, 1x1
convolution and BatchNorm when the shapes differ), because the feature it passes on is detached (the separation-decoupling
mechanism, SDM); the last module learns from cross-entropy and CAT-KD's class-attention loss. The
feature entering each next module is scaled by `1 + A`, `A` a weighted sum of its normalised mean
and max absolute activation over channels (non-directional activation mapping, NDAM), in training
and at test time.

## Why

LAKD trains against the teacher's features like FitNet or OFD, but without the deep layers'
gradients reaching the shallow ones; in the paper it beats KD on all six pairs (table below). It
fits mdistiller's interface without touching a model: it acts through forward hooks on blocks it
finds by name (`layer1.0`, `block1.layer.0`, `block0`, `blocks.0.0`), which all CIFAR models here
have.

## Changes

Based on `{base[:12]}`. Only new files and inserted lines: no existing line changes.

| file | change and why |
|---|---|
{changes}

```
{diff_stat.rstrip()}
```

## What to look at

- `LAKD.forward_train` back-propagates each local loss inside the forward (`BACKWARD: eager`, the
  default) and returns it detached, for logging; `BaseTrainer` zeroes the gradients before the
  forward and back-propagates the sum of the returned losses, which then trains the last module.
  `BACKWARD: joint` builds one graph instead (same gradients, more memory).
- One GPU per run: with several, `nn.DataParallel`'s replicas would share the hooks' per-step
  state (the teacher's features of the step).
- Requirements beyond the README's: Python >= 3.8 and PyTorch >= 1.10 (`torch.autocast`).

## How it was tested

- The code is generated from mdistiller-lakd, whose tests cover it: NDAM's formula against hand
  computations, the gradient stop between modules, eager and joint backward giving equal
  gradients, the block lists of every CIFAR model, the errors for bad `LOCATIONS`.
- Its generator's tests apply this change to a stand-in checkout with this repository's layout:
  exactly these files change, by inserted lines only; LAKD imports and trains a step there with
  nothing of mdistiller-lakd importable; the student checkpoint records NDAM and `tools/eval.py`
  restores it (the same logits as the trained student).
- {MEASURED}

## Numbers

CIFAR-100 top-1 **reported in the paper** (its recipe: 300 epochs, Nesterov SGD, linear decay).
Full runs of these configs (240 epochs) have not been measured yet.

{chr(10).join(paper_table())}
"""
