"""The project stands on its own: no file points outside it, and docs/METHOD.md documents every LAKD key."""
import os
import subprocess

from conftest import REPO_ROOT
from mdistiller_lakd.engine.cfg import CFG

OUTSIDE = "../" + "shared"  # spelt in two parts so that this file does not match itself


def project_files() -> list[str]:
    """The files git tracks, plus the untracked ones it does not ignore (new work); a walk of the
    tree outside .git when this is not a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        listed = [
            os.path.relpath(os.path.join(root, name), REPO_ROOT)
            for root, dirs, names in os.walk(REPO_ROOT) if ".git" not in root.split(os.sep) for name in names
        ]
    return [path for path in listed if os.path.isfile(os.path.join(REPO_ROOT, path))]


def test_no_project_file_refers_to_the_outside_shared_folder():
    files = project_files()
    assert "docs/METHOD.md" in files and "mdistiller_lakd/engine/cfg.py" in files
    offenders = []
    for path in files:
        with open(os.path.join(REPO_ROOT, path), "rb") as f:
            if OUTSIDE.encode() in f.read():
                offenders.append(path)
    assert offenders == []


def test_method_doc_lists_every_lakd_key():
    with open(os.path.join(REPO_ROOT, "docs", "METHOD.md")) as f:
        doc = f.read()

    def keys(node, prefix=""):
        for name, value in node.items():
            yield from keys(value, f"{prefix}{name}.") if hasattr(value, "items") else [prefix + name]

    missing = [key for key in keys(CFG.LAKD) if f"| `{key}` |" not in doc]
    assert missing == []
    for section in ("## Separation-Decoupling Mechanism", "## Non-Directional Activation Mapping", "## The CAT loss",
                    "## Extracurricular Knowledge", "## The location rule", "## Config keys"):
        assert section in doc  # the sections the code's docstrings point to
