"""The lines the pull request inserts into upstream's own files, each placed by an anchor.

Every edit only inserts lines: each finder reads one upstream file and returns ``Insertion``s at
lines it locates by structure (``ast``) rather than by line number, or raises ``AnchorError``
naming the file and the anchor it could not find (upstream changed), before anything is written.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Callable

from .sources import PAPER, assignment_target, cfg_node_lines

PAPER_URL = "https://arxiv.org/abs/2408.11478"


class AnchorError(ValueError):
    """An upstream file lacks a line the pull request anchors an insertion on."""

    def __init__(self, path: str, anchor: str):
        super().__init__(f"{path}: anchor not found: {anchor} (upstream changed; nothing was written)")


@dataclass(frozen=True)
class Insertion:
    """``lines`` inserted before line ``before`` (0-based) of ``path``, found by ``anchor``."""

    path: str
    before: int
    lines: tuple[str, ...]
    anchor: str


def apply(text: str, insertions: list[Insertion]) -> str:
    """``text`` with the insertions made (several at one line keep their order)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    for insertion in sorted(insertions, key=lambda i: i.before, reverse=True):
        lines[insertion.before: insertion.before] = [line + "\n" for line in insertion.lines]
    return "".join(lines)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _parse(path: str, text: str) -> ast.Module:
    try:
        return ast.parse(text)
    except SyntaxError as error:
        raise AnchorError(path, f"Python source that parses ({error.msg}, line {error.lineno})") from None


def _last_relative_import(path: str, tree: ast.Module, anchor: str, module_prefix: str = "", level: int = 1) -> int:
    """The line after the last top-level ``from <module_prefix>... import`` of the given level."""
    imports = [
        node for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == level and (node.module or "").startswith(module_prefix)
    ]
    if not imports:
        raise AnchorError(path, anchor)
    return imports[-1].end_lineno


def registry(path: str, text: str) -> list[Insertion]:
    """``from .LAKD import LAKD`` after the distillers' imports and ``"LAKD": LAKD,`` as the last
    entry of ``distiller_dict``."""
    tree, lines = _parse(path, text), text.splitlines()
    after_imports = _last_relative_import(path, tree, "the distillers' `from .X import X` lines")
    block = "the `distiller_dict = {` block"
    registry = next(
        (node.value for node in tree.body
         if assignment_target(node) == "distiller_dict" and isinstance(node.value, ast.Dict)), None
    )
    if registry is None or not registry.keys:
        raise AnchorError(path, block)
    if any(isinstance(key, ast.Constant) and key.value == "LAKD" for key in registry.keys):
        raise AnchorError(path, f"{block} without a LAKD entry (it has one already)")
    closing, last = registry.end_lineno - 1, registry.values[-1]
    between = lines[last.end_lineno - 1][last.end_col_offset:] + "".join(lines[last.end_lineno: closing])
    if closing == last.end_lineno - 1 or "," not in between or lines[closing].strip() != "}":
        raise AnchorError(path, f"{block}, one entry per line, a comma after the last, `}}` on its own line")
    entry = f'{_indent(lines[last.lineno - 1])}"LAKD": LAKD,'
    return [
        Insertion(path, after_imports, ("from .LAKD import LAKD",), "the distillers' imports"),
        Insertion(path, closing, (entry,), block),
    ]


def config_node(path: str, text: str) -> list[Insertion]:
    """The ``CFG.LAKD`` node, generated from this project's, after the last method's node (the last
    group of ``CFG.<NODE> = CN()`` and its keys)."""
    tree = _parse(path, text)
    targets = [assignment_target(statement) for statement in tree.body]
    if any(t == "CFG.LAKD" or t.startswith("CFG.LAKD.") for t in targets):
        raise AnchorError(path, "a config without a CFG.LAKD node (it has one already)")
    starts = [i for i, t in enumerate(targets) if t.count(".") == 1 and t.startswith("CFG.")
              and isinstance(tree.body[i].value, ast.Call)]
    if not starts:
        raise AnchorError(path, "the config nodes (`CFG.<NODE> = CN()`)")
    node = targets[starts[-1]]
    end = starts[-1]
    while end + 1 < len(targets) and targets[end + 1].startswith(node + "."):
        end += 1
    header = "# LAKD(Local Attention Knowledge Distillation) CFG"
    return [Insertion(path, tree.body[end].end_lineno, ("", header, *cfg_node_lines()),
                      f"the last config node ({node})")]


def student_checkpoint(path: str, text: str) -> list[Insertion]:
    """After each ``student_state = {"model": <distiller>.student.state_dict()}``: the distiller's
    ``student_checkpoint_extras()`` joins the student checkpoint when it has them."""
    tree, lines = _parse(path, text), text.splitlines()
    insertions = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and assignment_target(node) == "student_state"):
            continue
        distiller = next(
            (sub.value for sub in ast.walk(node.value) if isinstance(sub, ast.Attribute) and sub.attr == "student"),
            None,
        )
        if distiller is None:
            continue
        owner, indent = ast.get_source_segment(text, distiller), _indent(lines[node.lineno - 1])
        insertions.append(Insertion(path, node.end_lineno, (
            f"{indent}# what evaluating the student needs besides its weights (LAKD: its NDAM settings)",
            f'{indent}if hasattr({owner}, "student_checkpoint_extras"):',
            f"{indent}    student_state.update({owner}.student_checkpoint_extras())",
        ), "the trainer's `student_state = {...student.state_dict()}`"))
    if not insertions:
        raise AnchorError(path, 'the line building `student_state = {"model": ...student.state_dict()}`')
    return insertions


def eval_ndam(path: str, text: str) -> list[Insertion]:
    """Before ``model = Vanilla(model)``: NDAM re-attached from a checkpoint that records it."""
    tree, lines = _parse(path, text), text.splitlines()
    wrap = next(
        (node for node in ast.walk(tree)
         if assignment_target(node) == "model" and isinstance(node.value, ast.Call)
         and getattr(node.value.func, "id", None) == "Vanilla"),
        None,
    )
    if wrap is None:
        raise AnchorError(path, "the model loading that ends with `model = Vanilla(model)`")
    loads = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_checkpoint"
             and [ast.unparse(arg) for arg in node.args] == ["args.ckpt"]]
    if not loads:
        raise AnchorError(path, "`load_checkpoint(args.ckpt)` (the student checkpoint's loading)")
    after_imports = _last_relative_import(path, tree, "the `from mdistiller... import` lines", "mdistiller", level=0)
    indent = _indent(lines[wrap.lineno - 1])
    return [
        Insertion(path, after_imports, ("from mdistiller.lakd.ndam import attach_ndam",), "the mdistiller imports"),
        Insertion(path, wrap.lineno - 1, (
            f'{indent}if args.ckpt != "pretrain":',
            f"{indent}    # a LAKD student: NDAM is part of its forward, so it is restored with the weights",
            f'{indent}    ndam = load_checkpoint(args.ckpt).get("ndam")',
            f"{indent}    if ndam:",
            f"{indent}        attach_ndam(model, **ndam)",
        ), "`model = Vanilla(model)`"),
    ]


README_SECTION = (
    "",
    "### LAKD",
    "",
    f"[LAKD]({PAPER_URL}) (Local Attention Knowledge Distillation) cuts the student into local modules:",
    "each but the last learns only from its own feature loss against the teacher, the gradient stopped",
    "between modules (SDM); the last learns from cross-entropy and CAT-KD's class-attention loss; the",
    "feature passed on from a module is re-weighted by its activation maps (NDAM), in training and at test",
    "time. Configs for the six CIFAR-100 pairs, with this repo's recipe, are in `configs/cifar100/lakd/`:",
    "",
    "  ```bash",
    "  # on one GPU: the replicas of nn.DataParallel would share LAKD's per-step hook state",
    "  CUDA_VISIBLE_DEVICES=0 python3 tools/train.py --cfg configs/cifar100/lakd/res32x4_res8x4.yaml",
    "  ```",
    "",
    "NDAM belongs to the trained student: its `student_*` checkpoints record the NDAM settings and",
    "`tools/eval.py` restores them. Top-1 on CIFAR-100 as reported in the paper, with the paper's recipe",
    "(300 epochs, Nesterov SGD, linear decay); runs of the configs above are not reported here yet:",
    "",
)


def paper_table() -> tuple[str, ...]:
    """The paper's Table 1 (CIFAR-100 top-1) for the six pairs, KD and LAKD, in upstream's layout."""
    pairs = ("ResNet56 <br> ResNet20", "ResNet110 <br> ResNet32", "ResNet32x4 <br> ResNet8x4",
             "WRN-40-2 <br> WRN-16-2", "WRN-40-2 <br> WRN-40-1", "VGG13 <br> VGG8")
    rows = {"KD": (70.66, 73.08, 73.33, 74.92, 73.54, 72.98),
            "LAKD (paper)": (72.01, 74.26, 75.72, 75.87, 74.47, 74.45)}
    return (
        "| Teacher <br> Student |" + "|".join(pairs) + "|",
        "|:---:|" + ":---:|" * len(pairs),
        *(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for name, values in rows.items()),
    )


def readme(path: str, text: str) -> list[Insertion]:
    """LAKD's row in the methods table, then a short section after that table."""
    lines = text.splitlines()
    anchor = "the methods table after 'supports the following distillation methods'"
    intro = next((i for i, line in enumerate(lines) if "supports the following distillation methods" in line), None)
    if intro is None or intro + 1 >= len(lines) or not lines[intro + 1].startswith("|"):
        raise AnchorError(path, anchor)
    end = intro + 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    header = [cell.strip() for cell in lines[intro + 1].strip("|").split("|")]
    if header[:2] != ["Method", "Paper Link"] or "CIFAR-100" not in header:
        raise AnchorError(path, f"{anchor}, with columns Method | Paper Link | CIFAR-100 ...")
    cells = ["LAKD", f" <{PAPER_URL}> "] + ["&check;" if name == "CIFAR-100" else " " for name in header[2:]]
    row = "|" + "|".join(cells) + "|"
    return [Insertion(path, end, (row, *README_SECTION, *paper_table()), anchor)]


# Upstream file -> the finder of its insertions.
UPSTREAM_EDITS: dict[str, Callable[[str, str], list[Insertion]]] = {
    "mdistiller/distillers/__init__.py": registry,
    "mdistiller/engine/cfg.py": config_node,
    "mdistiller/engine/trainer.py": student_checkpoint,
    "tools/eval.py": eval_ndam,
    "README.md": readme,
}
