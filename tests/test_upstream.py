"""tools/upstream.py: LAKD written into a stand-in checkout of upstream mdistiller.

The stand-in is a git repository with upstream's layout and the lines the command anchors on,
written here (its models are this project's, which have upstream's names); it holds no upstream
code. The generated package must train there with this project not importable.
"""
import difflib
import os
import runpy
import shutil
import subprocess
import sys
import textwrap

import pytest
from yacs.config import CfgNode as CN

from conftest import REPO_ROOT
from mdistiller_lakd.engine.cfg import CFG
from mdistiller_lakd.upstream import sources
from mdistiller_lakd.upstream.edits import UPSTREAM_EDITS, AnchorError
from mdistiller_lakd.upstream.sources import GenerationError, cfg_node_lines, rewrite_imports

UPSTREAM_MAIN = runpy.run_path(os.path.join(REPO_ROOT, "tools", "upstream.py"))["main"]

STANDIN = {
    "mdistiller/__init__.py": "",
    "mdistiller/distillers/__init__.py": """\
        from ._base import Vanilla

        distiller_dict = {
            "NONE": Vanilla,
        }
        """,
    # upstream's Distiller interface, nothing more
    "mdistiller/distillers/_base.py": """\
        import torch.nn as nn


        class Distiller(nn.Module):
            def __init__(self, student, teacher):
                super().__init__()
                self.student, self.teacher = student, teacher

            def train(self, mode=True):
                super().train(mode)
                self.teacher.eval()
                return self

            def get_learnable_parameters(self):
                return list(self.student.parameters())

            def get_extra_parameters(self):
                return 0

            def forward(self, **kwargs):
                if self.training:
                    return self.forward_train(**kwargs)
                return self.student(kwargs["image"])[0]


        class Vanilla(nn.Module):
            def __init__(self, student):
                super().__init__()
                self.student = student

            def forward(self, **kwargs):
                return self.student(kwargs["image"])[0]
        """,
    "mdistiller/engine/__init__.py": "",
    "mdistiller/engine/cfg.py": """\
        from yacs.config import CfgNode as CN

        CFG = CN()

        CFG.EXPERIMENT = CN()
        CFG.EXPERIMENT.PROJECT = "distill"
        CFG.EXPERIMENT.NAME = ""
        CFG.EXPERIMENT.TAG = "default"

        CFG.DATASET = CN()
        CFG.DATASET.TYPE = "cifar100"

        CFG.DISTILLER = CN()
        CFG.DISTILLER.TYPE = "NONE"
        CFG.DISTILLER.TEACHER = "ResNet50"
        CFG.DISTILLER.STUDENT = "resnet32"

        CFG.SOLVER = CN()
        {solver}

        # KD CFG
        CFG.KD = CN()
        CFG.KD.TEMPERATURE = 4

        # a solver option after the method nodes
        CFG.SOLVER.DOT = CN()
        CFG.SOLVER.DOT.DELTA = 0.075
        """,
    "mdistiller/engine/utils.py": """\
        import torch


        def save_checkpoint(obj, path):
            torch.save(obj, path)


        def load_checkpoint(path):
            return torch.load(path, map_location="cpu", weights_only=True)
        """,
    "mdistiller/engine/trainer.py": """\
        import os

        from .utils import save_checkpoint


        class BaseTrainer:
            def __init__(self, distiller, log_path):
                self.distiller, self.log_path = distiller, log_path

            def save_student(self):
                student_state = {"model": self.distiller.module.student.state_dict()}
                save_checkpoint(student_state, os.path.join(self.log_path, "student_latest"))
        """,
    "tools/eval.py": """\
        import argparse

        import torch

        from mdistiller.distillers import Vanilla
        from mdistiller.models import cifar_model_dict
        from mdistiller.engine.utils import load_checkpoint

        if __name__ == "__main__":
            parser = argparse.ArgumentParser()
            parser.add_argument("-m", "--model")
            parser.add_argument("-c", "--ckpt", default="pretrain")
            parser.add_argument("--images")
            parser.add_argument("--out")
            args = parser.parse_args()
            model = cifar_model_dict[args.model][0](num_classes=10)
            model.load_state_dict(load_checkpoint(args.ckpt)["model"])
            model = Vanilla(model)
            model.eval()
            with torch.no_grad():
                torch.save(model(image=torch.load(args.images, weights_only=True)), args.out)
        """,
    "README.md": """\
        # MDistiller

        MDistiller supports the following distillation methods on CIFAR-100, ImageNet and MS-COCO:
        |Method|Paper Link|CIFAR-100|ImageNet|MS-COCO|
        |:---:|:---:|:---:|:---:|:---:|
        |KD| <https://arxiv.org/abs/1503.02531> |&check;|&check;| |

        ### Installation
        """,
}
# upstream's solver keys, with upstream's defaults (which are ours)
SOLVER_KEYS = ("BATCH_SIZE", "EPOCHS", "LR", "LR_DECAY_STAGES", "LR_DECAY_RATE", "WEIGHT_DECAY", "MOMENTUM", "TYPE")
EDITED = sorted(UPSTREAM_EDITS)
ADDED = sorted([*sources.SHIPPED.values()] + [
    f"configs/cifar100/lakd/{name}" for name in os.listdir(os.path.join(REPO_ROOT, "configs", "cifar100", "lakd"))
    if name.endswith(".yaml")
])


def git(path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(autouse=True)
def no_git_identity(tmp_path, monkeypatch):
    """As in CI: no git configuration at all (the command brings its own identity)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    for key in ("AUTHOR", "COMMITTER"):
        for what in ("NAME", "EMAIL"):
            monkeypatch.delenv(f"GIT_{key}_{what}", raising=False)
    monkeypatch.delenv("EMAIL", raising=False)


@pytest.fixture
def standin(tmp_path):
    root = tmp_path / "mdistiller"
    for name, text in STANDIN.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        solver = "\n".join(f"CFG.SOLVER.{key} = {CFG.SOLVER[key]!r}" for key in SOLVER_KEYS)
        (root / name).write_text(textwrap.dedent(text).replace("{solver}", solver))
    shutil.copytree(os.path.join(REPO_ROOT, "mdistiller_lakd", "models"), root / "mdistiller" / "models",
                    ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "init", "-q", "-b", "master")
    git(root, "add", "-A")
    git(root, "-c", "user.name=Upstream", "-c", "user.email=up@example.org", "commit", "-q", "-m", "upstream")
    return root


def state(path) -> tuple[str, str, str]:
    """HEAD, status (untracked included) and branches: what a refusal must leave as it was."""
    return (git(path, "rev-parse", "HEAD"), git(path, "status", "--porcelain", "--untracked-files=all"),
            git(path, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads"))


def run(capsys, *args) -> tuple[int, str, str]:
    code = UPSTREAM_MAIN([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_writes_one_commit_on_a_new_branch(standin, tmp_path, capsys):
    base = git(standin, "rev-parse", "HEAD").strip()
    patch, describe = tmp_path / "lakd.patch", tmp_path / "PR.md"
    code, out, err = run(capsys, "--mdistiller", standin, "--patch", patch, "--describe", describe)
    assert code == 0, err
    assert git(standin, "symbolic-ref", "--short", "HEAD").strip() == "lakd"
    assert git(standin, "rev-parse", "lakd~1").strip() == base
    assert git(standin, "log", "-1", "--format=%an <%ae>|%cn|%s").strip() == (
        "mdistiller-lakd <mdistiller-lakd@users.noreply.github.com>|mdistiller-lakd|"
        "Add LAKD (Local Attention Knowledge Distillation)"
    )
    changes = sorted(line.split("\t") for line in git(standin, "diff", "--name-status", base, "lakd").splitlines())
    assert changes == sorted([["A", name] for name in ADDED] + [["M", name] for name in EDITED])
    assert git(standin, "status", "--porcelain") == ""
    assert git(standin, "branch", "--list", "master").strip() == "master"  # the base branch is untouched
    assert patch.read_text().startswith(f"From {git(standin, 'rev-parse', 'HEAD').strip()} ")
    text = describe.read_text()
    assert f"Based on `{base[:12]}`" in text and f"{len(ADDED) + len(EDITED)} files changed" in text
    assert all(f"`{name}`" in text for name in EDITED)
    # the patch re-applies on the base: it is the commit
    git(standin, "checkout", "-q", "master")
    git(standin, "apply", "--check", str(patch))


def test_upstream_files_only_gain_lines(standin, capsys):
    assert run(capsys, "--mdistiller", standin)[0] == 0
    for name in EDITED:
        before, after = git(standin, "show", f"master:{name}").splitlines(), git(standin, "show", f"lakd:{name}").splitlines()
        operations = {op for op, *_ in difflib.SequenceMatcher(None, before, after).get_opcodes()} - {"equal"}
        assert operations == {"insert"}, name
    registry = git(standin, "show", "lakd:mdistiller/distillers/__init__.py")
    assert 'distiller_dict = {\n    "NONE": Vanilla,\n    "LAKD": LAKD,\n}' in registry
    cfg = git(standin, "show", "lakd:mdistiller/engine/cfg.py")
    # after the last method node (KD), before the solver option that follows it
    assert cfg.index("CFG.KD.TEMPERATURE") < cfg.index("CFG.LAKD = CN()") < cfg.index("CFG.SOLVER.DOT = CN()")
    readme = git(standin, "show", "lakd:README.md")
    assert "|KD| <https://arxiv.org/abs/1503.02531> |&check;|&check;| |\n|LAKD| <https://arxiv.org/abs/2408.11478> |&check;| | |\n" in readme


def test_the_config_node_is_this_projects():
    namespace = {"CN": CN}
    exec("\n".join(["CFG = CN()", *cfg_node_lines()]), namespace)
    assert namespace["CFG"].LAKD == CFG.LAKD and list(namespace["CFG"]) == ["LAKD"]


# Runs with only the stand-in importable (-I, and this package blocked): trains one LAKD step from
# the generated config and node, saves the student through the edited trainer and evaluates it
# with the edited tools/eval.py, which must give the trained distiller's logits.
TRAIN_WITHOUT_PACKAGE = """
import os, runpy, sys
sys.modules["mdistiller_lakd"] = None
tree = sys.argv[1]
sys.path.insert(0, tree)
import torch
from mdistiller.distillers import distiller_dict
from mdistiller.engine.cfg import CFG as cfg
from mdistiller.engine.trainer import BaseTrainer
from mdistiller.models import cifar_model_dict
try:
    import mdistiller_lakd
    raise SystemExit("mdistiller_lakd is importable")
except ImportError:
    pass
torch.manual_seed(0)
cfg.merge_from_file(os.path.join(tree, "configs/cifar100/lakd/res56_res20.yaml"))
cfg.merge_from_list(["DISTILLER.TEACHER", "resnet14", "DISTILLER.STUDENT", "resnet8", "LAKD.LOCATIONS", [1, 2, 3]])
teacher, student = (cifar_model_dict[name][0](num_classes=10) for name in ("resnet14", "resnet8"))
distiller = distiller_dict[cfg.DISTILLER.TYPE](student, teacher, cfg)
before = {k: v.clone() for k, v in student.state_dict().items()}
optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.1)
distiller.train()
images, target = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
optimizer.zero_grad()
_, losses = distiller(image=images, target=target, epoch=1)
sum(losses.values()).backward()
optimizer.step()
assert sorted(losses) == ["loss_cat", "loss_ce", "loss_local_1", "loss_local_2"], sorted(losses)
assert all(torch.isfinite(v) for v in losses.values())
moved = [k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
assert any(k.startswith("layer1.0.") for k in moved) and "fc.weight" in moved, moved
BaseTrainer(torch.nn.DataParallel(distiller), tree).save_student()
distiller.eval()
torch.save(images, os.path.join(tree, "images.pt"))
with torch.no_grad():
    trained = distiller(image=images)
sys.argv = ["eval.py", "-m", "resnet8", "-c", os.path.join(tree, "student_latest"),
            "--images", os.path.join(tree, "images.pt"), "--out", os.path.join(tree, "logits.pt")]
runpy.run_path(os.path.join(tree, "tools/eval.py"), run_name="__main__")
evaluated = torch.load(os.path.join(tree, "logits.pt"), weights_only=True)
plain = cifar_model_dict["resnet8"][0](num_classes=10).eval()
plain.load_state_dict(student.state_dict())
with torch.no_grad():
    assert (plain(images)[0] - trained).abs().max() > 1e-3  # the weights alone: another network
assert torch.equal(evaluated, trained)
ours = [m for m, module in sys.modules.items() if module is not None and m.startswith("mdistiller")
        and not os.path.abspath(module.__file__).startswith(os.path.abspath(tree))]
assert ours == [], ours
print("ok", torch.load(os.path.join(tree, "student_latest"), weights_only=True)["ndam"])
"""


def test_generated_package_trains_where_this_package_is_not_importable(standin, capsys):
    assert run(capsys, "--mdistiller", standin)[0] == 0
    result = subprocess.run(
        [sys.executable, "-I", "-c", TRAIN_WITHOUT_PACKAGE, str(standin)], capture_output=True, text=True,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok {'locations': [1, 2, 3], 'abs': True, 'avg_weight': 0.3, 'max_weight': 0.7}" in result.stdout
    for name in ADDED:  # nothing of this project in the shipped text
        assert "mdistiller_lakd" not in (standin / name).read_text(), name


def test_dry_run_lists_everything_and_changes_nothing(standin, capsys):
    unchanged = state(standin)
    code, out, _ = run(capsys, "--mdistiller", standin, "--dry-run")
    assert code == 0 and state(standin) == unchanged
    assert all(f"new   {name}" in out for name in ADDED)
    assert all(f"edit  {name}:" in out for name in EDITED)
    assert '+     "LAKD": LAKD,' in out and "dry run: nothing written" in out


def _dirty(root):
    (root / "README.md").write_text("changed\n")
    (root / "notes.txt").write_text("untracked\n")


def _commit(root, message):
    git(root, "-c", "user.name=U", "-c", "user.email=u@example.org", "commit", "-q", "-am", message)


def _not_mdistiller(root):
    git(root, "rm", "-q", "tools/eval.py")
    _commit(root, "no eval")


def _no_anchor(root):
    text = (root / "tools" / "eval.py").read_text().replace("model = Vanilla(model)", "wrapped = Vanilla(model)")
    (root / "tools" / "eval.py").write_text(text)
    _commit(root, "eval changed")


@pytest.mark.parametrize("prepare, message", [
    (lambda root: git(root, "branch", "lakd"), "branch 'lakd' exists; give another --branch, or --force"),
    (_dirty, "uncommitted changes: README.md, notes.txt"),
    (_not_mdistiller, "not an mdistiller tree: its HEAD lacks tools/eval.py"),
    (_no_anchor, "tools/eval.py: anchor not found: the model loading that ends with `model = Vanilla(model)`"),
])
def test_refusals_leave_the_checkout_as_it_was(standin, capsys, prepare, message):
    prepare(standin)
    unchanged = state(standin)
    code, _, err = run(capsys, "--mdistiller", standin)
    assert code == 2 and message in err, err
    assert state(standin) == unchanged


def test_refuses_a_folder_that_is_not_a_checkout(tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    code, _, err = run(capsys, "--mdistiller", folder)
    assert code == 2 and "not a git checkout" in err and list(folder.iterdir()) == []


def test_force_replaces_an_existing_branch(standin, capsys):
    git(standin, "branch", "lakd")
    assert run(capsys, "--mdistiller", standin, "--force")[0] == 0
    assert git(standin, "rev-parse", "lakd~1") == git(standin, "rev-parse", "master")
    assert "mdistiller/distillers/LAKD.py" in git(standin, "show", "--name-only", "lakd")


def test_imports_map_onto_upstream_and_anything_else_is_refused():
    provided = {"mdistiller.distillers._base": {"Distiller"}}
    absolute = "from mdistiller_lakd.lakd.blocks import find_blocks\nimport torch\n"
    assert rewrite_imports(absolute, "lakd/sdm.py", provided) == "from .blocks import find_blocks\nimport torch\n"
    kept = "from ..lakd.cam import cat_loss\nfrom ._base import Distiller\n"
    assert rewrite_imports(kept, "distillers/LAKD.py", provided) == kept
    with pytest.raises(GenerationError, match=r"mdistiller_lakd/distillers/LAKD.py:2 imports mdistiller_lakd.distillers._common"):
        rewrite_imports("import torch\nfrom ._common import probe\n", "distillers/LAKD.py", provided)
    with pytest.raises(GenerationError, match=r"lakd/cam.py:1 imports numpy: upstream mdistiller ships LAKD with torch alone"):
        rewrite_imports("import numpy as np\n", "lakd/cam.py", provided)
    with pytest.raises(GenerationError, match=r"imports \['Distiller'\] from mdistiller.distillers._base, which upstream"):
        rewrite_imports("from ._base import Distiller\n", "distillers/LAKD.py", {"mdistiller.distillers._base": set()})


def test_methods_for_this_projects_trainer_hooks_are_left_out():
    source = textwrap.dedent("""\
        from ._base import CompileTarget, Distiller


        class LAKD(Distiller):
            def forward_train(self):
                return 1

            def compile_plan(self):
                return [CompileTarget("teacher", self.teacher)], ""

            def forward_test(self):
                return 2
        """)
    stripped = sources.strip_trainer_only_methods(source, "distillers/LAKD.py")
    assert stripped == source.replace("CompileTarget, ", "").replace(
        '\n    def compile_plan(self):\n        return [CompileTarget("teacher", self.teacher)], ""\n', "")
    used_elsewhere = source.replace("return 2", "return CompileTarget")
    with pytest.raises(GenerationError, match=r"LAKD.py uses CompileTarget outside compile_plan"):
        sources.strip_trainer_only_methods(used_elsewhere, "distillers/LAKD.py")
    # The real LAKD has such a method; what ships has neither it nor the name.
    shipped = sources.shipped_files({"mdistiller.distillers._base": {"Distiller"}})["mdistiller/distillers/LAKD.py"]
    assert "def compile_plan" in (sources.PACKAGE_ROOT / "distillers/LAKD.py").read_text()
    assert "compile_plan" not in shipped and "CompileTarget" not in shipped


def test_every_text_rewrite_is_needed():
    texts = [(sources.PACKAGE_ROOT / ours).read_text() for ours in sources.SHIPPED]
    assert [old for old in sources.TEXT_REWRITES if not any(old in text for text in texts)] == []


def test_anchor_errors_name_the_file_and_the_anchor():
    with pytest.raises(AnchorError, match=r"mdistiller/distillers/__init__.py: anchor not found: the `distiller_dict = \{` block"):
        UPSTREAM_EDITS["mdistiller/distillers/__init__.py"]("mdistiller/distillers/__init__.py", "from .KD import KD\n")
    with pytest.raises(AnchorError, match=r"a comma after the last"):
        UPSTREAM_EDITS["mdistiller/distillers/__init__.py"](
            "mdistiller/distillers/__init__.py", 'from .KD import KD\ndistiller_dict = {\n    "KD": KD\n}\n')
    with pytest.raises(AnchorError, match=r"mdistiller/engine/trainer.py: anchor not found: the line building `student_state"):
        UPSTREAM_EDITS["mdistiller/engine/trainer.py"]("mdistiller/engine/trainer.py", "state = {}\n")


def test_an_unwritable_output_changes_nothing(standin, tmp_path, capsys):
    unchanged = state(standin)
    describe = tmp_path / "PR.md"
    code, _, err = run(capsys, "--mdistiller", standin, "--describe", describe, "--patch", tmp_path / "no" / "x.patch")
    assert code == 2 and "x.patch" in err
    assert state(standin) == unchanged and not describe.exists()


def test_a_checkout_with_lakd_is_refused(standin, capsys):
    assert run(capsys, "--mdistiller", standin)[0] == 0
    unchanged = state(standin)
    code, _, err = run(capsys, "--mdistiller", standin, "--branch", "lakd2")
    assert code == 2 and "HEAD already has mdistiller/distillers/LAKD.py" in err, err
    assert state(standin) == unchanged
