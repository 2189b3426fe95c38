"""The project stands on its own: no file points outside it, docs/METHOD.md documents every LAKD key,
and the README (one screen, its two commands those CI runs) and the pages under docs/ link only to
files and headings that exist."""
import glob
import os
import re
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


README = os.path.join(REPO_ROOT, "README.md")
DOC_PAGES = sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
# [text](target) and ![alt](target); the target up to whitespace or ')' (a title may follow).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def prose(text: str) -> str:
    """Markdown without its code: fenced blocks, indented blocks and `inline code` hold no links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"^(?: {4}|\t).*$", "", text, flags=re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as '-'."""
    with open(path) as f:
        headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", prose(f.read()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def broken_links(path: str) -> list[str]:
    with open(path) as f:
        targets = LINK.findall(prose(f.read()))
    broken = []
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... : not files of the project
            continue
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(linked):
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in heading_anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def test_every_relative_link_of_the_readme_and_docs_resolves():
    assert len(DOC_PAGES) >= 10
    broken = {os.path.relpath(path, REPO_ROOT): broken_links(path) for path in [README, *DOC_PAGES]}
    assert {path: links for path, links in broken.items() if links} == {}


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Some section\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#some-section), [gone](gone.md), [bad anchor](other.md#nope), "
                    "![ok](other.md) `[code](gone.md)` [self](#a-heading)\n\n    [indented](gone.md)\n\n## A heading\n")
    assert broken_links(str(page)) == ["gone.md: no such file", "other.md#nope: no heading with that anchor"]


def test_the_readme_is_one_screen_linking_every_docs_page_and_holding_the_two_commands():
    with open(README) as f:
        readme = f.read()
    assert len(readme) < 10_000
    linked = {os.path.normpath(os.path.join(REPO_ROOT, target.partition("#")[0])) for target in LINK.findall(readme)}
    assert [os.path.relpath(page, REPO_ROOT) for page in DOC_PAGES if page not in linked] == []
    with open(os.path.join(REPO_ROOT, ".ci", "run")) as f:
        ci_command = f.read().strip().splitlines()[-1]
    for command in ("pip install -e . && python tools/train.py --cfg configs/cifar100/lakd/res56_res20.yaml", ci_command):
        assert f"\n    {command}\n" in readme
