"""LAKD as one commit on a new branch of an upstream mdistiller checkout (``tools/upstream.py``).

``plan`` reads the checkout at ``HEAD``, generates every new file and finds every anchor; nothing
is written until all of that has succeeded. ``make`` then builds the commit without touching the
work tree, writes the optional patch and description, and only last creates the branch and checks
it out.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass

from .checkout import Checkout, CheckoutError
from .describe import commit_message, description
from .edits import UPSTREAM_EDITS, Insertion, apply
from .sources import config_files, shipped_files


@dataclass
class Plan:
    checkout: Checkout
    added: dict[str, str]  # new files: path -> text
    edited: dict[str, str]  # upstream files: path -> text with the insertions made
    insertions: list[Insertion]

    @property
    def files(self) -> dict[str, str]:
        return {**self.added, **self.edited}

    def summary(self) -> str:
        """The files and the inserted lines, for ``--dry-run`` and the command's report."""
        lines = [f"new   {path} ({text.count(chr(10))} lines)" for path, text in self.added.items()]
        for insertion in self.insertions:
            lines.append(f"edit  {insertion.path}:{insertion.before + 1} (at {insertion.anchor}), inserting:")
            lines += [f"        + {line}" for line in insertion.lines]
        return "\n".join(lines)


def _defined_names(text: str) -> set[str]:
    """Top-level classes, functions and assignments of a module."""
    names = set()
    for node in ast.parse(text).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def plan(path: str | os.PathLike, branch: str, force: bool = False) -> Plan:
    """Everything the commit will contain; raises ``CheckoutError``, ``AnchorError`` or
    ``GenerationError`` (all ``ValueError``) with nothing written."""
    checkout = Checkout(path)
    checkout.check_clean()
    checkout.check_branch(branch, force)
    provided = {"mdistiller.distillers._base": _defined_names(checkout.read("mdistiller/distillers/_base.py"))}
    added = {**shipped_files(provided), **config_files(checkout.read("mdistiller/engine/cfg.py"))}
    present = [name for name in added if checkout.has(name)]
    if present:
        raise CheckoutError(f"{path}: HEAD already has {', '.join(present)}")
    edited, insertions = {}, []
    for name, find in UPSTREAM_EDITS.items():
        text = checkout.read(name)
        found = find(name, text)
        edited[name] = apply(text, found)
        insertions += found
    return Plan(checkout, added, edited, insertions)


def make(plan: Plan, branch: str, patch: str | None = None, describe: str | None = None) -> str:
    """Commit the plan on ``branch`` (checked out afterwards); returns the commit id."""
    checkout = plan.checkout
    commit = checkout.commit(plan.files, commit_message(sorted(plan.files)))
    outputs = {describe: lambda c: description(checkout.diff_stat(c), checkout.head), patch: checkout.format_patch}
    written = []
    try:
        for path, text_of in outputs.items():
            if path:
                with open(path, "w", encoding="utf-8") as f:
                    written.append(path)
                    f.write(text_of(commit))
        checkout.publish(branch, commit)
    except BaseException:
        for path in written:  # nothing of a failed run stays behind
            os.remove(path)
        raise
    return commit
