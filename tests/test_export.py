"""tools/export.py: a LAKD and a KD student of tiny runs exported to each format, loaded where this
package cannot be imported, equal to the in-package student (NDAM inside); the refusal of an export
that differs; the bad inputs; tools/eval.py --no-ndam."""
import copy
import dataclasses
import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from mdistiller_lakd.engine.build import load_trained_model
from mdistiller_lakd.engine.checkpoint import load_checkpoint, save_checkpoint
from mdistiller_lakd.export import EXPORT_BATCH, FORMATS, example_images
from mdistiller_lakd.models import imagenet_model_dict
from test_lakd_train import CONFIG as LAKD_CONFIG, prepare, train
from test_trainer import ANSI

EXPORT_MAIN = runpy.run_path(os.path.join(REPO_ROOT, "tools", "export.py"))["main"]
KD_CONFIG = os.path.join("configs", "cifar100", "kd", "res56_res20.yaml")
NDAM = {"locations": [1, 4, 9], "abs": True, "avg_weight": 0.3, "max_weight": 0.7}
CHECK_BATCH = EXPORT_BATCH + 3  # another batch size than the one exported with

# Loads each export with plain torch / onnxruntime in a process where importing this package fails.
LOAD_WITHOUT_PACKAGE = r"""
import importlib.abc, json, sys

class RefusePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "mdistiller_lakd":
            raise ImportError("mdistiller_lakd must not be needed to load an export")

sys.meta_path.insert(0, RefusePackage())
try:
    import mdistiller_lakd
    sys.exit("mdistiller_lakd is importable here")
except ImportError:
    pass
import torch
exports, images_path, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
images = torch.load(images_path, weights_only=True)
logits = {}
for fmt, path in exports.items():
    if fmt == "pt2":
        logits[fmt] = torch.export.load(path).module()(images)
    elif fmt == "torchscript":
        logits[fmt] = torch.jit.load(path)(images)
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits[fmt] = torch.from_numpy(session.run(["logits"], {"image": images.numpy()})[0])
torch.save({fmt: value.detach() for fmt, value in logits.items()}, out_path)
assert not any(name.startswith("mdistiller_lakd") for name in sys.modules)
"""


# onnx needs the onnx extra (in the test extra): exporter and runtime.
ONNX_HERE = all(importlib.util.find_spec(name) for name in ("onnxscript", "onnxruntime"))
FORMATS_HERE = sorted(FORMATS) if ONNX_HERE else ["pt2", "torchscript"]


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """``{method: (student_best, data root)}`` of a tiny LAKD run and a tiny KD run (resnet20)."""
    runs = {}
    for method, config in (("lakd", LAKD_CONFIG), ("kd", KD_CONFIG)):
        folder = str(tmp_path_factory.mktemp(method))
        prepare(folder)
        result, run_dir = train(folder, config=config)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[method] = (os.path.join(run_dir, "student_best"), os.path.join(folder, "data"))
    return runs


def export(capsys, *args: str) -> tuple[int, str, str]:
    code = EXPORT_MAIN(list(args))
    captured = capsys.readouterr()
    return code, ANSI.sub("", captured.out), captured.err


@pytest.mark.parametrize("method", ["lakd", "kd"])
def test_exports_load_without_the_package_and_equal_the_student(students, method, tmp_path, capsys):
    ckpt, root = students[method]
    exports = {}
    for fmt in FORMATS_HERE:
        exports[fmt] = str(tmp_path / f"student.{fmt}")
        code, out, err = export(capsys, "-c", ckpt, "--format", fmt, "-o", exports[fmt], "--root", root, "-bs", "16")
        assert code == 0, err
        # The check ran on the validation images too (32 in the fake CIFAR-100), all top-1 agreeing.
        assert re.search(r"32 validation images: largest logit difference \S+, top-1 agreement 100\.00%", out), out
    images = example_images("cifar100", CHECK_BATCH, seed=7)
    torch.save(images, tmp_path / "images.pt")
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITHOUT_PACKAGE, json.dumps(exports),
         str(tmp_path / "images.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path, capture_output=True, text=True,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)

    with torch.no_grad():
        expected = load_trained_model(ckpt, "resnet20", "cifar100", 100, "-m").eval()(images)[0]
        plain = load_trained_model(ckpt, "resnet20", "cifar100", 100, "-m", with_ndam=False).eval()(images)[0]
    assert set(logits) == set(exports)
    for fmt, got in logits.items():
        assert got.shape == (CHECK_BATCH, 100)
        assert torch.allclose(got, expected, rtol=0, atol=1e-4), fmt
        if method == "lakd":  # NDAM is in the export: the weights alone are another network
            assert (got - plain).abs().max() > 1e-2, fmt
        else:
            assert torch.allclose(got, plain, rtol=0, atol=1e-4), fmt


def _without_ndam(model: torch.nn.Module) -> torch.nn.Module:
    plain = copy.deepcopy(model)
    for module in plain.modules():
        module._forward_hooks.clear()
    return plain


def _nudged(model: torch.nn.Module) -> torch.nn.Module:
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.model.fc.bias.add_(1e-6)
    return nudged


@pytest.mark.parametrize("tamper, atol, refused", [
    (_without_ndam, "1e-4", True),  # an exporter that lost the hooks
    (_nudged, "1e-4", False),  # within the tolerance
    (_nudged, "0", True),  # the same export, a tolerance of 0
])
def test_an_export_that_differs_is_refused_and_not_written(
    students, tamper, atol, refused, tmp_path, capsys, monkeypatch
):
    ckpt, root = students["lakd"]
    pt2 = FORMATS["pt2"]
    tampered = dataclasses.replace(pt2, export=lambda model, example: pt2.export(tamper(model), example))
    monkeypatch.setitem(FORMATS, "pt2", tampered)
    out = tmp_path / "student.pt2"
    code, _, err = export(capsys, "-c", ckpt, "--format", "pt2", "-o", str(out), "--atol", atol, "--root", root)
    if refused:
        assert code == 1
        assert "the pt2 export differs from the student by" in err and f"--atol {float(atol):g}" in err
        assert f"{out} not written" in err
        assert os.listdir(tmp_path) == []  # no temporary file left either
    else:
        assert code == 0 and out.is_file(), err


@pytest.fixture
def bad_checkpoints(students, tmp_path) -> dict[str, str]:
    ckpt, _ = students["lakd"]
    student = load_checkpoint(ckpt)
    paths = {"latest": os.path.join(os.path.dirname(ckpt), "latest"), "unnamed": str(tmp_path / "unnamed.pth")}
    save_checkpoint({"model": student["model"]}, paths["unnamed"])  # upstream's layout: weights only
    return paths


@pytest.mark.parametrize("case, args, message", [
    ("latest", ["--format", "pt2"], r"{latest} is a training checkpoint \(the whole distiller\), not a student"),
    ("student", ["--format", "pt2", "-m", "resnet32"],
     r"-m resnet32: {student} holds a student of architecture 'resnet20'"),
    ("student", ["--format", "pt2", "-d", "cifar10"], r"-d cifar10: {student} holds a student of dataset 'cifar100'"),
    ("unnamed", ["--format", "pt2", "-d", "cifar100"], r"-m: {unnamed} does not name its architecture; give it with -m"),
    ("unnamed", ["--format", "pt2", "-d", "cifar100", "-m", "resnet32"],
     r"checkpoint {unnamed} does not fit the model 'resnet32'"),
    ("unnamed", ["--format", "pt2", "-d", "cifar100", "-m", "resnet1"], r"-m: unknown cifar100 model 'resnet1'"),
    ("student", ["--format", "tflite"], r"argument --format: invalid choice: 'tflite'"),
])
def test_bad_input_is_named_and_nothing_is_written(students, bad_checkpoints, case, args, message, tmp_path, capsys):
    paths = {**bad_checkpoints, "student": students["lakd"][0]}
    out = tmp_path / "out" / "student.export"
    try:
        code, _, err = export(capsys, "-c", paths[case], "-o", str(out), *args)
    except SystemExit as exit_:  # argparse's own errors
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2
    assert re.search(message.format(**{key: re.escape(path) for key, path in paths.items()}), err), err
    assert "Traceback" not in err and not out.parent.exists()


def test_an_imagenet_student_exports_with_ndam(tmp_path, capsys):
    torch.manual_seed(0)
    model = imagenet_model_dict["ResNet18"]()
    ckpt = str(tmp_path / "student_best")
    save_checkpoint({"model": model.state_dict(), "arch": "ResNet18", "dataset": "imagenet",
                     "ndam": {**NDAM, "locations": [2, 4, 8]}}, ckpt)
    out = str(tmp_path / "student.pt2")
    code, printed, err = export(capsys, "-c", ckpt, "--format", "pt2", "-o", out, "--root", str(tmp_path))
    assert code == 0, err
    assert "checked on random images only" in printed
    images = example_images("imagenet", 1, seed=3)
    with torch.no_grad():
        got = torch.export.load(out).module()(images)
        expected = load_trained_model(ckpt, "ResNet18", "imagenet", 1000, "-m").eval()(images)[0]
        plain = model.eval()(images)[0]
    assert got.shape == (1, 1000) and torch.allclose(got, expected, rtol=0, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2


def test_eval_without_ndam_scores_the_weights_alone(students, capsys):
    ckpt, root = students["lakd"]
    eval_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "eval.py"))["main"]
    losses = []
    for extra in ([], ["--no-ndam"]):
        assert eval_main(["-m", "resnet20", "-c", ckpt, "--root", root, "-bs", "16", "-j", "0", *extra]) == 0
        losses.append(float(re.search(r"Loss: (\d+\.\d+)", ANSI.sub("", capsys.readouterr().out)).group(1)))
    assert losses[0] != losses[1]


def test_onnx_without_onnxruntime_is_written_unverified(students, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxscript")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    out = tmp_path / "student.onnx"
    code, printed, err = export(capsys, "-c", students["kd"][0], "--format", "onnx", "-o", str(out))
    assert code == 0, err
    assert "the export is NOT verified" in printed and "largest logit difference" not in printed
    assert out.is_file()
