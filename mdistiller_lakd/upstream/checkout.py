"""The git side of the pull request: checks on the upstream checkout and a commit made without
touching its work tree or index until the branch is complete.

The commit is assembled with plumbing (blobs, a temporary index, ``commit-tree``) under a fixed
identity given through the environment, so it needs no git configuration (CI runs as root with
none). Only then does ``publish`` create the branch and switch the checkout to it; if switching
fails, the branch is put back as it was.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

IDENTITY = {
    "GIT_AUTHOR_NAME": "mdistiller-lakd",
    "GIT_AUTHOR_EMAIL": "mdistiller-lakd@users.noreply.github.com",
    "GIT_COMMITTER_NAME": "mdistiller-lakd",
    "GIT_COMMITTER_EMAIL": "mdistiller-lakd@users.noreply.github.com",
}
# The upstream files the pull request reads or edits: a tree without them is not mdistiller.
REQUIRED = (
    "mdistiller/distillers/__init__.py",
    "mdistiller/distillers/_base.py",
    "mdistiller/engine/cfg.py",
    "mdistiller/engine/trainer.py",
    "tools/eval.py",
    "README.md",
)


class CheckoutError(ValueError):
    """The checkout cannot take the pull request; nothing in it was changed."""


class Checkout:
    """A git work tree of upstream mdistiller, read at its ``HEAD``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckoutError(f"{path}: not a directory")
        top = self._run("rev-parse", "--show-toplevel", check=False)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != self.path.resolve():
            raise CheckoutError(f"{path}: not a git checkout (the top of a git work tree)")
        head = self._run("rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
        if head.returncode != 0:
            raise CheckoutError(f"{path}: the repository has no commit to branch from")
        self.head = head.stdout.strip()
        missing = [name for name in REQUIRED if not self.has(name)]
        if missing:
            raise CheckoutError(f"{path}: not an mdistiller tree: its HEAD lacks {', '.join(missing)}")

    def _run(self, *args: str, input: bytes | None = None, env: dict | None = None, check: bool = True):
        result = subprocess.run(
            ["git", "-C", str(self.path), *args], input=input, capture_output=True,
            env={**os.environ, **IDENTITY, **(env or {})}, text=input is None,
        )
        if check and result.returncode != 0:
            stderr = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
            raise CheckoutError(f"{self.path}: git {' '.join(args)} failed: {stderr.strip()}")
        return result

    def git(self, *args: str) -> str:
        return self._run(*args).stdout

    def has(self, name: str) -> bool:
        return self._run("cat-file", "-e", f"HEAD:{name}", check=False).returncode == 0

    def read(self, name: str) -> str:
        return self.git("show", f"HEAD:{name}")

    def check_clean(self) -> None:
        dirty = self.git("status", "--porcelain", "--untracked-files=all").splitlines()
        if dirty:
            files = ", ".join(line[3:] for line in dirty)
            raise CheckoutError(f"{self.path}: the work tree has uncommitted changes: {files}; commit or stash them")

    def current_branch(self) -> str | None:
        branch = self._run("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        return branch.stdout.strip() or None

    def branch_tip(self, branch: str) -> str | None:
        tip = self._run("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False)
        return tip.stdout.strip() or None

    def check_branch(self, branch: str, force: bool) -> None:
        if self._run("check-ref-format", "--branch", branch, check=False).returncode != 0:
            raise CheckoutError(f"--branch {branch!r}: not a valid branch name")
        if self.branch_tip(branch) is None:
            return
        if not force:
            raise CheckoutError(f"{self.path}: branch '{branch}' exists; give another --branch, or --force to replace it")
        if self.current_branch() == branch:
            raise CheckoutError(f"{self.path}: branch '{branch}' is checked out; switch to the base branch to replace it")

    def commit(self, files: dict[str, str], message: str) -> str:
        """A commit of ``HEAD`` with ``files`` (path -> text) written, made without touching the
        work tree, the index or any ref; returns its id."""
        modes = {}
        for line in self.git("ls-tree", "-r", "HEAD", "--", *files).splitlines():
            meta, name = line.split("\t", 1)
            modes[name] = meta.split()[0]
        with tempfile.TemporaryDirectory() as scratch:
            index = {"GIT_INDEX_FILE": os.path.join(scratch, "index")}
            self._run("read-tree", "HEAD", env=index)
            for name, text in files.items():
                blob = self._run("hash-object", "-w", "--stdin", input=text.encode()).stdout.decode().strip()
                self._run("update-index", "--add", "--cacheinfo", f"{modes.get(name, '100644')},{blob},{name}", env=index)
            tree = self._run("write-tree", env=index).stdout.strip()
        return self._run("commit-tree", tree, "-p", self.head, input=message.encode()).stdout.decode().strip()

    def format_patch(self, commit: str) -> str:
        return self.git("format-patch", "-1", "--stdout", commit)

    def diff_stat(self, commit: str) -> str:
        return self.git("diff", "--stat", f"{commit}~1", commit)

    def publish(self, branch: str, commit: str) -> None:
        """Point ``branch`` at ``commit`` and check it out; on failure the branch is restored."""
        previous = self.branch_tip(branch)
        self.git("update-ref", f"refs/heads/{branch}", commit, previous or "")
        switched = self._run("checkout", "--quiet", branch, check=False)
        if switched.returncode != 0:
            if previous is None:
                self._run("update-ref", "-d", f"refs/heads/{branch}", commit, check=False)
            else:
                self._run("update-ref", f"refs/heads/{branch}", previous, commit, check=False)
            raise CheckoutError(f"{self.path}: git checkout {branch} failed: {switched.stderr.strip()}")
