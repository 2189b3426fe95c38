"""tools/analyze.py and the analysis package: CKA against hand-computed values, the event reader,
and each sub-command's PNG and JSON against a direct computation on a tiny run."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from tensorboardX import SummaryWriter

from conftest import REPO_ROOT
from fake_cifar import write_cifar
from mdistiller_lakd.analysis.cka import cka_from_grams, gram_linear, linear_cka
from mdistiller_lakd.analysis.ek import agreement_stats
from mdistiller_lakd.analysis.events import read_scalars
from mdistiller_lakd.analysis.loading import evenly_spaced
from mdistiller_lakd.dataset import get_dataset
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.engine.checkpoint import save_checkpoint
from mdistiller_lakd.engine.metrics import extracurricular_knowledge
from mdistiller_lakd.lakd.cam import HeadMapHook, class_activation_maps, classifier_weight
from mdistiller_lakd.models import cifar_model_dict

analyze_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "analyze.py"))["main"]
NUM_TEST = 12
ARCH = "resnet8"


# --------------------------------------------------------------------------------------------------
# CKA

def test_cka_of_identical_features_is_one():
    x = torch.randn(50, 3, 4, 4)
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_cka_of_independent_features_is_near_zero():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 4, generator=generator), torch.randn(2000, 4, generator=generator)
    assert linear_cka(x, y) < 0.01


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert linear_cka(x, 3.7 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(3.7 * x @ rotation, y) == pytest.approx(linear_cka(x, y))
    assert linear_cka(x, y) < 0.9  # the invariance is not a constant


def test_cka_hand_computed_and_equal_to_the_feature_space_formula():
    # Centred: x = (-1, 0, 1), y = (2, -1, -1)/3; for one feature CKA is the squared correlation:
    # (x.y)^2 / (|x|^2 |y|^2) = 1 / (2 * 2/3) = 3/4.
    x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [0.0]])
    assert linear_cka(x, y) == pytest.approx(0.75)
    a, b = torch.randn(30, 7, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    feature_space = (b.T @ a).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm())
    assert linear_cka(a, b) == pytest.approx(float(feature_space))


def test_cka_of_constant_features_is_zero_and_sizes_must_agree():
    assert linear_cka(torch.ones(5, 2), torch.randn(5, 2)) == 0.0
    with pytest.raises(ValueError, match="same examples"):
        cka_from_grams(gram_linear(torch.randn(4, 2)), gram_linear(torch.randn(5, 2)))


# --------------------------------------------------------------------------------------------------
# Events and EK

def test_events_reader_merges_resumed_files_and_skips_a_cut_record(tmp_path):
    first = SummaryWriter(str(tmp_path / "train.events"))
    for epoch in (1, 2):
        first.add_scalar("train_losses/loss_ce", 1.0 / epoch, epoch)
    first.close()
    resumed = SummaryWriter(str(tmp_path / "train.events"), filename_suffix=".resumed")
    resumed.add_scalar("train_losses/loss_ce", 0.25, 2)  # epoch 2 redone after a kill
    resumed.add_scalar("train_losses/loss_ce", 0.2, 3)
    resumed.close()
    with open(sorted((tmp_path / "train.events").iterdir())[-1], "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00partial")  # a record still being written
    assert read_scalars(str(tmp_path)) == {"train_losses/loss_ce": [(1, 1.0), (2, 0.25), (3, pytest.approx(0.2))]}


def test_agreement_stats_by_hand():
    target = torch.tensor([0, 1, 2, 3])
    teacher = torch.tensor([0, 1, 9, 9])  # wrong on images 2 and 3
    student = torch.tensor([0, 9, 2, 9])  # right on 0 and 2; agrees with the teacher on 0 and 3
    stats = agreement_stats(student, teacher, target)
    assert stats == {"images": 4, "ek": 50.0, "agreement": 50.0, "student_top1": 50.0, "teacher_top1": 50.0,
                     "both_right": 1, "student_right_teacher_wrong": 1, "student_wrong_teacher_right": 1,
                     "both_wrong": 1}
    assert stats["ek"] == extracurricular_knowledge(student, teacher, target)


# --------------------------------------------------------------------------------------------------
# The sub-commands on a tiny run

def _write_config(path: str, method: str, root: str, teacher_ckpt: str) -> None:
    with open(path, "w") as f:
        f.write(f"DISTILLER:\n  TYPE: {method}\n  TEACHER: {ARCH}\n  STUDENT: {ARCH}\n  TEACHER_CKPT: {teacher_ckpt}\n"
                f"DATASET:\n  ROOT: {root}\n  NUM_WORKERS: 0\n  TEST:\n    BATCH_SIZE: 5\nSOLVER:\n  EPOCHS: 2\n")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cifar_model_dict[ARCH][0](num_classes=100)


LOSSES = {"KD": {"loss_ce": [2.0, 1.5], "loss_kd": [0.8, 0.6]},
          "FITNET": {"loss_ce": [2.5, 1.75], "loss_feat": [3.0, 2.0]}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs (KD, FitNet) of resnet8 under one resnet8 teacher, on 12 CIFAR-100 test
    images, each with its config, student_best and tensorboard events."""
    base = tmp_path_factory.mktemp("analyze")
    root = str(base / "data")
    write_cifar(root, "cifar100", num_train=16, num_test=NUM_TEST)
    teacher_ckpt = str(base / "teacher.pth")
    save_checkpoint({"model": _model(0).state_dict()}, teacher_ckpt)
    folders = []
    for seed, (method, losses) in enumerate(LOSSES.items(), start=1):
        folder = base / "out" / f"{method.lower()},res8,res8"
        os.makedirs(folder)
        _write_config(str(folder / "config.yaml"), method, root, teacher_ckpt)
        save_checkpoint({"model": _model(seed).state_dict(), "arch": ARCH, "dataset": "cifar100"},
                        str(folder / "student_best"))
        writer = SummaryWriter(str(folder / "train.events"))
        for name, values in losses.items():
            for epoch, value in enumerate(values, start=1):
                writer.add_scalar(f"train_losses/{name}", value, epoch)
                writer.add_scalar("test_acc", 10.0 * epoch, epoch)
        writer.close()
        folders.append(str(folder))
    return {"root": root, "teacher": teacher_ckpt, "folders": folders, "base": base}


def _load(path: str) -> torch.nn.Module:
    model = cifar_model_dict[ARCH][0](num_classes=100)
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    return model.eval()


def _images(runs, indices):
    cfg = load_cfg(os.path.join(runs["folders"][0], "config.yaml"))
    _, val_loader, _, _ = get_dataset(cfg)
    samples = [val_loader.dataset[i] for i in indices]
    return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])


def _run(runs, command: str, *options: str) -> tuple[dict, tuple[int, int]]:
    from PIL import Image

    out = str(runs["base"] / f"{command}.png")
    assert analyze_main([command, *runs["folders"], "--out", out, *options]) == 0
    with Image.open(out) as png:
        size = png.size
    with open(os.path.splitext(out)[0] + ".json") as f:
        return json.load(f), size


@pytest.fixture
def viz():
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    from mdistiller_lakd.analysis import figures
    from mdistiller_lakd.analysis.plotting import DPI

    return figures, DPI


def test_cka_command_matches_direct_computation(runs, viz):
    figures, dpi = viz
    data, size = _run(runs, "cka", "--num-images", "8")
    assert size == (int(figures.CKA_PANEL[0] * 2 * dpi), int(figures.CKA_PANEL[1] * dpi))
    indices = evenly_spaced(NUM_TEST, 8)
    assert data["images"] == 8 and data["image_indices"] == indices
    images, _ = _images(runs, indices)
    with torch.no_grad():
        teacher_feats = _load(runs["teacher"])(images)[1]["feats"]
        for folder, panel in zip(runs["folders"], data["runs"]):
            student_feats = _load(os.path.join(folder, "student_best"))(images)[1]["feats"]
            expected = [[linear_cka(t, s) for s in student_feats] for t in teacher_feats]
            assert panel["run"] == folder and len(panel["cka"]) == len(teacher_feats) == 4
            assert panel["cka"] == [pytest.approx(row, abs=1e-6) for row in expected]
            assert panel["student_shapes"][-1] == list(student_feats[-1].shape[1:])


def test_maps_command_matches_direct_computation(runs, viz):
    figures, dpi = viz
    data, size = _run(runs, "maps", "--images", "3", "0", "7")
    columns = 1 + 2 * 3  # input, then activation and class map of the teacher and of both students
    assert size == (int(figures.MAP_CELL * columns * dpi), int(figures.MAP_CELL * 3 * dpi))
    images, labels = _images(runs, [3, 0, 7])
    assert data["image_indices"] == [3, 0, 7] and data["labels"] == labels.tolist()
    paths = [runs["teacher"]] + [os.path.join(folder, "student_best") for folder in runs["folders"]]
    assert [entry["model"] for entry in data["models"]] == ["teacher", "KD", "FITNET"]
    for path, entry in zip(paths, data["models"]):
        model = _load(path)
        hook = HeadMapHook(model)
        with torch.no_grad():
            logits, _ = model(images)
        cams = class_activation_maps(hook.map, classifier_weight(model))[torch.arange(3), labels]
        assert entry["prediction"] == logits.argmax(1).tolist()
        assert torch.allclose(torch.tensor(entry["activation"]), hook.map.abs().mean(1), atol=1e-5)
        assert torch.allclose(torch.tensor(entry["class_map"]), cams, atol=1e-4)


def test_curves_command_reads_the_logged_losses(runs, viz):
    figures, dpi = viz
    data, size = _run(runs, "curves")
    assert data["tags"] == ["train_losses/loss_ce", "train_losses/loss_feat", "train_losses/loss_kd"]
    assert size == (int(figures.CURVE_PANEL[0] * 3 * dpi), int(figures.CURVE_PANEL[1] * dpi))
    kd, fitnet = (data["runs"][folder] for folder in runs["folders"])
    assert kd["train_losses/loss_kd"] == [[1, pytest.approx(0.8)], [2, pytest.approx(0.6)]]
    assert fitnet["train_losses/loss_feat"] == [[1, 3.0], [2, 2.0]] and "train_losses/loss_kd" not in fitnet


def test_curves_command_names_the_logged_tags_when_none_match(runs, viz, capsys):
    assert analyze_main(["curves", runs["folders"][0], "--tags", "nothing", "--out", str(runs["base"] / "n.png")]) == 2
    assert "matches no logged scalar; the runs log: test_acc, train_losses/loss_ce" in capsys.readouterr().err


def test_ek_command_matches_direct_computation(runs, viz):
    figures, dpi = viz
    data, size = _run(runs, "ek")
    assert size == (int(figures.EK_FIGURE[0] * dpi), int(figures.EK_FIGURE[1] * dpi))
    images, labels = _images(runs, range(NUM_TEST))
    with torch.no_grad():
        teacher_pred = _load(runs["teacher"])(images)[0].argmax(1)
        for folder, entry in zip(runs["folders"], data["runs"]):
            student_pred = _load(os.path.join(folder, "student_best"))(images)[0].argmax(1)
            expected = agreement_stats(student_pred, teacher_pred, labels)
            assert entry == {"run": folder, "label": entry["label"], **expected}


def test_analyze_without_matplotlib_names_the_extra(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert analyze_main(["ek", *runs["folders"], "--out", str(runs["base"] / "none.png")]) == 2
    assert 'needs matplotlib, the \'viz\' extra: pip install -e ".[viz]"' in capsys.readouterr().err
    assert not (runs["base"] / "none.png").exists()


def test_run_without_config_needs_cfg(runs, viz, tmp_path, capsys):
    folder = tmp_path / "kd,res8,res8"
    os.makedirs(folder)
    os.link(os.path.join(runs["folders"][0], "student_best"), folder / "student_best")
    out = str(tmp_path / "ek.png")
    assert analyze_main(["ek", str(folder), "--out", out]) == 2
    assert f"{folder}: no config.yaml in the run folder; pass the config it was trained with: --cfg FILE" in (
        capsys.readouterr().err)
    assert analyze_main(["ek", str(folder), "--out", out, "--cfg", os.path.join(runs["folders"][0], "config.yaml"),
                         "--ckpt", "student_best"]) == 0


def test_student_checkpoint_with_ndam_is_analysed_with_it(runs, viz, tmp_path):
    """A student checkpoint's "ndam" entry re-attaches LAKD's NDAM before the analysis."""
    from mdistiller_lakd.lakd.ndam import attach_ndam

    folder = tmp_path / "lakd,res8,res8"
    os.makedirs(folder)
    _write_config(str(folder / "config.yaml"), "KD", runs["root"], runs["teacher"])
    entry = {"locations": [1, 2, 3], "abs": True, "avg_weight": 0.3, "max_weight": 0.7}
    save_checkpoint({"model": _model(5).state_dict(), "arch": ARCH, "ndam": entry}, str(folder / "student_best"))
    out = str(tmp_path / "maps.png")
    assert analyze_main(["maps", str(folder), "--images", "1", "2", "--out", out]) == 0
    with open(str(tmp_path / "maps.json")) as f:
        analysed = torch.tensor(json.load(f)["models"][1]["activation"])

    images, _ = _images(runs, [1, 2])
    model = _load(str(folder / "student_best"))
    hook = HeadMapHook(model)
    with torch.no_grad():
        model(images)
        plain = hook.map.abs().mean(1)
        attach_ndam(model, **entry)
        model(images)
        with_ndam = hook.map.abs().mean(1)
    assert torch.allclose(analysed, with_ndam, atol=1e-5) and not torch.allclose(analysed, plain, atol=1e-3)


def test_a_run_of_tools_train_is_read_by_both_tools(runs, viz, tmp_path, capsys):
    """End to end: one KD epoch with tools/train.py; compare reads its folder and saved config,
    analyze its events and checkpoint, and the EK that analyze computes is the one the trainer logged."""
    config = str(tmp_path / "kd.yaml")
    _write_config(config, "KD", runs["root"], runs["teacher"])
    prefix = str(tmp_path / "out")
    subprocess.run(
        [sys.executable, "tools/train.py", "--cfg", config, "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "8",
         "EXPERIMENT.TAG", "kd,res8,res8", "LOG.PREFIX", prefix],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )
    run_dir = os.path.join(prefix, "distill", "kd,res8,res8SOLVER.EPOCHS:1,SOLVER.BATCH_SIZE:8,EXPERIMENT.TAG:kd,res8,res8")
    compare_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "compare.py"))["main"]
    assert compare_main([prefix]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "| KD |" in line]
    assert len(row) == 1 and "| cifar100 | resnet8 → resnet8 |" in row[0] and "config.yaml" in row[0]
    assert row[0].endswith("| done |")

    out = str(tmp_path / "curves.png")
    assert analyze_main(["curves", run_dir, "--out", out]) == 0
    with open(str(tmp_path / "curves.json")) as f:
        assert sorted(json.load(f)["tags"]) == ["train_losses/loss_ce", "train_losses/loss_kd"]

    assert analyze_main(["ek", run_dir, "--ckpt", "student_latest", "--out", str(tmp_path / "ek.png")]) == 0
    with open(str(tmp_path / "ek.json")) as f:
        ek = json.load(f)["runs"][0]["ek"]
    with open(os.path.join(run_dir, "worklog.txt")) as f:
        logged = [line for line in f if line.startswith("test_ek:")]
    assert logged == [f"test_ek: {ek:.2f}\n"]


def _acam_run(runs, folder, save_distiller: bool = True):
    """An ACAM_KD run of resnet8 under the shared teacher: student_best and, beside it, ``best``
    with the distiller's modules (spatial units scaled up so that the masks are far from 1/2)."""
    from mdistiller_lakd.distillers.ACAM_KD import ACAM_KD

    os.makedirs(folder)
    _write_config(str(folder / "config.yaml"), "ACAM_KD", runs["root"], runs["teacher"])
    distiller = ACAM_KD(_model(6), _load(runs["teacher"]), load_cfg(str(folder / "config.yaml")))
    with torch.no_grad():
        distiller.acam[0].spatial_units.mul_(100.0)
    save_checkpoint({"model": distiller.student.state_dict(), "arch": ARCH}, str(folder / "student_best"))
    if save_distiller:
        save_checkpoint({"model": distiller.state_dict()}, str(folder / "best"))
    return distiller.eval()


def test_maps_command_shows_acam_kd_masks_next_to_the_other_maps(runs, viz, tmp_path):
    figures, dpi = viz
    folder = tmp_path / "acam_kd,res8,res8"
    distiller = _acam_run(runs, folder)
    out = str(tmp_path / "maps.png")
    assert analyze_main(["maps", runs["folders"][0], str(folder), "--images", "1", "2", "--out", out]) == 0
    from PIL import Image

    with Image.open(out) as png:
        columns = 1 + 2 * 3 + 6  # input, map and CAM of teacher, KD and ACAM-KD, then its 6 masks
        assert png.size == (int(figures.MAP_CELL * columns * dpi), int(figures.MAP_CELL * 2 * dpi))
    with open(str(tmp_path / "maps.json")) as f:
        models = json.load(f)["models"]
    assert [entry["model"] for entry in models] == ["teacher", "KD", "ACAM_KD"]
    assert "spatial_masks" not in models[1]
    images, _ = _images(runs, [1, 2])
    expected = distiller.masks(images)[0]["spatial"]
    analysed = torch.tensor(models[2]["spatial_masks"][0])
    assert analysed.shape == (2, 6, 8, 8) and torch.allclose(analysed, expected, atol=1e-5)
    assert analysed.std() > 0.1  # the saved modules were loaded: fresh ones give masks near 1/2


def test_maps_of_acam_kd_without_its_distiller_checkpoint_is_refused(runs, viz, tmp_path, capsys):
    folder = tmp_path / "acam_kd,res8,res8"
    _acam_run(runs, folder, save_distiller=False)
    assert analyze_main(["maps", str(folder), "--images", "1", "--out", str(tmp_path / "maps.png")]) == 2
    assert f"{folder}: no distiller checkpoint 'best' beside 'student_best'" in capsys.readouterr().err
