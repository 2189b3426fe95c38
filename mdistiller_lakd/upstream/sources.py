"""The files the pull request adds to upstream mdistiller, generated from this project's own.

LAKD's code ships as it is tested here: each file is read from this package, its imports are
mapped onto upstream's package by ``MODULE_MAP`` (and refused when a file imports anything else of
this package, or a library beyond torch), and its references to this project's documents are
rewritten by ``TEXT_REWRITES``. The ``CFG.LAKD`` node is cut out of ``engine/cfg.py``'s source and
the configs come from ``configs/cifar100/lakd/*.yaml``, so neither can drift from what runs here.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
import sysconfig
from pathlib import Path

import yaml

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # mdistiller_lakd/
REPO_ROOT = PACKAGE_ROOT.parent
PAPER = "arXiv:2408.11478"

# This project's file (relative to the package) -> upstream's path. lakd/acam.py is ACAM-KD's and
# stays here.
SHIPPED = {
    "distillers/LAKD.py": "mdistiller/distillers/LAKD.py",
    "lakd/__init__.py": "mdistiller/lakd/__init__.py",
    "lakd/blocks.py": "mdistiller/lakd/blocks.py",
    "lakd/sdm.py": "mdistiller/lakd/sdm.py",
    "lakd/ndam.py": "mdistiller/lakd/ndam.py",
    "lakd/cam.py": "mdistiller/lakd/cam.py",
}


def _module_name(path: str) -> str:
    """``mdistiller/lakd/sdm.py`` -> ``mdistiller.lakd.sdm`` (a package's ``__init__.py``: the package)."""
    return ".".join(Path(path).with_suffix("").parts).removesuffix(".__init__")


# Every module of this package a shipped file may import -> the upstream module that provides it:
# upstream's own (whose source must define the names imported) or a shipped one.
MODULE_MAP: dict[str, str] = {
    "mdistiller_lakd.distillers._base": "mdistiller.distillers._base",
    **{_module_name(f"mdistiller_lakd/{ours}"): _module_name(theirs) for ours, theirs in SHIPPED.items()},
}
THIRD_PARTY = ("torch",)  # besides the standard library

# Pointers at this project's documents, which upstream does not have -> what upstream reads.
TEXT_REWRITES = {
    "docs/METHOD.md's location rule": "The location rule",
    "(docs/METHOD.md, ": f"({PAPER}, ",
    "(docs/METHOD.md)": f"(the paper: {PAPER})",
    ", so they can move into upstream mdistiller as-is": "",
    "not from this project's classes, so upstream\nmdistiller's own model objects work too": (
        "not from particular classes, so any model of\nthese families works"
    ),
}
FOREIGN_WORDS = ("mdistiller_lakd", "docs/", "this project")  # none may survive the rewrite

# Methods for this project's trainer hooks that upstream's trainer never calls (SOLVER.COMPILE's
# plan) -> the names of our _base only they use: both are left out of the shipped files.
TRAINER_ONLY_METHODS = {"compile_plan": ("CompileTarget",)}


class GenerationError(ValueError):
    """A file of this project cannot be shipped as it is; the message names the file and why."""


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of a (possibly relative) ``from X import ...`` in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _relative(target: str, module: str, is_package: bool) -> tuple[int, str]:
    """``(level, name)`` of the relative import of ``target`` from ``module`` (both absolute)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    there = target.split(".")
    common = 0
    while common < min(len(here), len(there)) and here[common] == there[common]:
        common += 1
    return len(here) - common + 1, ".".join(there[common:])


def rewrite_imports(text: str, ours: str, provided: dict[str, set[str]]) -> str:
    """``text`` of the shipped file ``ours`` (relative to the package) with every import of this
    package mapped by ``MODULE_MAP``; ``provided`` gives the names each of upstream's own modules
    defines. Raises ``GenerationError`` for any import that does not map."""
    module, target_module = _module_name(f"mdistiller_lakd/{ours}"), _module_name(SHIPPED[ours])
    is_package = ours.endswith("__init__.py")
    lines = text.splitlines(keepends=True)
    for node in sorted(ast.walk(ast.parse(text)), key=lambda n: -getattr(n, "lineno", 0)):
        where = f"mdistiller_lakd/{ours}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                _check_library(alias.name, where)
        if not isinstance(node, ast.ImportFrom):
            continue
        source = _resolve(node, module, is_package)
        if source.split(".")[0] != "mdistiller_lakd":
            _check_library(source, where)
            continue
        if source not in MODULE_MAP:
            raise GenerationError(
                f"{where} imports {source}, which the pull request does not ship: move what LAKD "
                "needs into mdistiller_lakd/lakd/ (shipped as mdistiller/lakd/)"
            )
        target = MODULE_MAP[source]
        shipped = target in {_module_name(theirs) for theirs in SHIPPED.values()}
        missing = [] if shipped else sorted({a.name for a in node.names} - provided.get(target, set()))
        if missing:
            raise GenerationError(f"{where} imports {missing} from {target}, which upstream does not define")
        level, name = _relative(target, target_module, is_package)
        if (level, name) != (node.level, node.module or ""):
            new = ast.unparse(ast.ImportFrom(module=name or None, names=node.names, level=level)) + "\n"
            indent = lines[node.lineno - 1][: node.col_offset]
            lines[node.lineno - 1: node.end_lineno] = [indent + new]
    return "".join(lines)


def _is_stdlib(name: str) -> bool:
    if hasattr(sys, "stdlib_module_names"):  # Python >= 3.10
        return name in sys.stdlib_module_names
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None else None
    return origin in ("built-in", "frozen") or bool(origin and origin.startswith(sysconfig.get_paths()["stdlib"]))


def _check_library(name: str, where: str) -> None:
    root = name.split(".")[0]
    if root in THIRD_PARTY or root == "__future__" or _is_stdlib(root):
        return
    raise GenerationError(f"{where} imports {name}: upstream mdistiller ships LAKD with torch alone")


def strip_trainer_only_methods(text: str, ours: str) -> str:
    """``text`` without the methods of ``TRAINER_ONLY_METHODS`` (and the blank line before each)
    and without the names only they import; raises ``GenerationError`` if such a name is still used."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits, dropped = [], set()  # (first line, last line, replacement), 1-based
    for node in ast.walk(tree):
        for item in getattr(node, "body", []) if isinstance(node, ast.ClassDef) else []:
            if isinstance(item, ast.FunctionDef) and item.name in TRAINER_ONLY_METHODS:
                first = min([item.lineno] + [d.lineno for d in item.decorator_list])
                first -= lines[first - 2].strip() == ""
                edits.append((first, item.end_lineno, []))
                dropped.update(TRAINER_ONLY_METHODS[item.name])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and dropped & {alias.name for alias in node.names}:
            kept = [alias for alias in node.names if alias.name not in dropped]
            statement = ast.ImportFrom(module=node.module, names=kept, level=node.level)
            edits.append((node.lineno, node.end_lineno, [ast.unparse(statement) + "\n"] if kept else []))
    for first, last, new in sorted(edits, reverse=True):
        lines[first - 1: last] = new
    text = "".join(lines)
    for name in dropped:
        if re.search(rf"\b{name}\b", text):
            raise GenerationError(f"mdistiller_lakd/{ours} uses {name} outside {', '.join(TRAINER_ONLY_METHODS)}, "
                                  "which upstream's _base does not define")
    return text


def rewrite_text(text: str, ours: str) -> str:
    for old, new in TEXT_REWRITES.items():
        text = text.replace(old, new)
    for word in FOREIGN_WORDS:
        if word in text:
            line = text[: text.index(word)].count("\n") + 1
            raise GenerationError(
                f"mdistiller_lakd/{ours}:{line} mentions '{word}', which means nothing upstream: "
                "add the phrase to TEXT_REWRITES in mdistiller_lakd/upstream/sources.py"
            )
    return text


def shipped_files(provided: dict[str, set[str]]) -> dict[str, str]:
    """Upstream path -> content of LAKD's files, generated from this package."""
    files = {}
    for ours, theirs in SHIPPED.items():
        text = (PACKAGE_ROOT / ours).read_text(encoding="utf-8")
        text = strip_trainer_only_methods(text, ours)
        files[theirs] = rewrite_text(rewrite_imports(text, ours, provided), ours)
    return files


def _dotted(node: ast.AST) -> str:
    """``CFG.LAKD.LOSS`` for an attribute chain, "" for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def assignment_target(statement: ast.stmt) -> str:
    """The dotted target of a top-level ``A.B.C = ...`` statement, "" for any other statement."""
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        return _dotted(statement.targets[0])
    return ""


def cfg_node_lines(node: str = "LAKD") -> list[str]:
    """The ``CFG.<node>`` statements of this project's engine/cfg.py, as written there (with their
    comments), in order."""
    source = (PACKAGE_ROOT / "engine" / "cfg.py").read_text(encoding="utf-8")
    lines = source.splitlines()
    picked = []
    for statement in ast.parse(source).body:
        target = assignment_target(statement)
        if target == f"CFG.{node}" or target.startswith(f"CFG.{node}."):
            picked += lines[statement.lineno - 1: statement.end_lineno]
    return picked


def config_keys(cfg_source: str) -> set[str]:
    """Every key (``SOLVER.LR``) a cfg.py defines, read from its ``CFG.A.B = value`` statements."""
    keys = set()
    for statement in ast.parse(cfg_source).body:
        target = assignment_target(statement)
        if target.startswith("CFG."):
            keys.add(target[len("CFG."):])
    return keys


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        keys += _leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name]
    return keys


_TRAILING_COMMENT = re.compile(r"\s+#.*$")


def config_files(upstream_cfg_source: str) -> dict[str, str]:
    """Upstream path -> content of configs/cifar100/lakd/*.yaml (the Table-1 pairs with upstream's
    recipe), comments dropped (they point at this project's documents). Every key must be one of
    upstream's cfg.py or of the LAKD node."""
    known = config_keys(upstream_cfg_source) | config_keys("\n".join(cfg_node_lines()))
    files = {}
    for path in sorted((REPO_ROOT / "configs" / "cifar100" / "lakd").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        unknown = [key for key in _leaf_keys(yaml.safe_load(text)) if key not in known]
        if unknown:
            raise GenerationError(f"{path.relative_to(REPO_ROOT)}: keys upstream does not have: {unknown}")
        lines = [_TRAILING_COMMENT.sub("", line) for line in text.splitlines() if not line.lstrip().startswith("#")]
        stripped = "\n".join(lines) + "\n"
        if yaml.safe_load(stripped) != yaml.safe_load(text):
            raise GenerationError(f"{path.relative_to(REPO_ROOT)}: dropping its comments changes its values")
        files[f"configs/cifar100/lakd/{path.name}"] = stripped
    return files
