"""tools/compare.py and the run-folder reader: upstream's and our worklogs, grouping, statistics."""
import csv
import os
import runpy
import statistics
import sys

import pytest

from conftest import REPO_ROOT
from mdistiller_lakd.analysis.runs import (
    canonical_model, parse_worklog, read_run, split_overrides,
)

compare_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "compare.py"))["main"]
RULE = "-" * 25


def upstream_worklog(test_accs, best=True) -> str:
    """A worklog as upstream mdistiller writes it: os.linesep endings, no newline after best_acc."""
    lines = []
    for epoch, acc in enumerate(test_accs, start=1):
        lines += [RULE, f"epoch: {epoch}", "lr: 0.05", "train_acc: 50.00", "train_loss: 1.50",
                  f"test_acc: {acc:.2f}", "test_acc_top5: 90.00", "test_loss: 1.20", RULE]
    text = "".join(line + os.linesep for line in lines)
    return text + (f"best_acc\t{max(test_accs):.2f}" if best else "")


def our_worklog(test_accs, best=True) -> str:
    """Ours: the same blocks plus EK and agreement, and a newline after the best_acc line."""
    lines = []
    for epoch, acc in enumerate(test_accs, start=1):
        lines += [RULE, f"epoch: {epoch}", "lr: 0.05", "train_acc: 50.00", "train_loss: 1.50",
                  f"test_acc: {acc:.2f}", "test_acc_top5: 90.00", "test_loss: 1.20",
                  "test_ek: 30.00", "test_agreement: 80.00", RULE]
    return "\n".join(lines) + "\n" + (f"best_acc\t{max(test_accs):.2f}\n" if best else "")


def our_config(method: str, epochs: int, seed: int = 0, teacher: str = "resnet56", lr: float = 0.05) -> str:
    return (f"EXPERIMENT:\n  SEED: {seed}\nDISTILLER:\n  TYPE: {method}\n  TEACHER: {teacher}\n"
            f"  STUDENT: resnet20\nSOLVER:\n  EPOCHS: {epochs}\n  LR: {lr}\n")


def write_run(folder, worklog: str, config: str | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "worklog.txt"), "w", newline="") as f:
        f.write(worklog)
    if config is not None:
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(config)
    return str(folder)


# Accuracy curves of the runs below (4 epochs each).
UPSTREAM_KD = [60.0, 68.5, 70.25, 70.0]
UPSTREAM_VANILLA = [55.0, 66.0, 69.0, 68.75]
OURS_SEEDS = [[61.0, 69.0, 71.5, 71.25], [60.0, 70.0, 72.0, 71.75]]
OURS_VANILLA = [58.0, 67.0, 69.5, 69.5]


@pytest.fixture
def results(tmp_path):
    """Upstream and our output trees, with two seeds, a run still going and broken folders."""
    upstream = tmp_path / "upstream" / "cifar100_baselines"
    write_run(upstream / "kd,res56,res20", upstream_worklog(UPSTREAM_KD))
    write_run(upstream / "vanilla,res56,res20", upstream_worklog(UPSTREAM_VANILLA))
    ours = tmp_path / "ours" / "cifar100_lakd"
    write_run(ours / "lakd,res56,res20", our_worklog(OURS_SEEDS[0]), our_config("LAKD", 4))
    write_run(ours / "lakd,res56,res20EXPERIMENT.SEED:1", our_worklog(OURS_SEEDS[1]), our_config("LAKD", 4, seed=1))
    write_run(ours / "vanilla,resnet20", our_worklog(OURS_VANILLA), our_config("NONE", 4))
    # Still going: two of four epochs, no best_acc line.
    write_run(ours / "lakd,res56,res20SOLVER.LR:0.1", our_worklog([50.0, 60.0], best=False),
              our_config("LAKD", 4, lr=0.1))
    write_run(ours / "empty", "")
    write_run(ours / "garbage", "not a worklog\n\x00\x01")
    return tmp_path


def table_rows(output: str) -> list[list[str]]:
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_parse_worklog_reads_upstream_and_our_format():
    epochs, best = parse_worklog(upstream_worklog(UPSTREAM_KD))
    assert list(epochs) == [1, 2, 3, 4] and best == 70.25
    assert epochs[3] == {"lr": 0.05, "train_acc": 50.0, "train_loss": 1.5, "test_acc": 70.25,
                         "test_acc_top5": 90.0, "test_loss": 1.2}
    epochs, best = parse_worklog(our_worklog(OURS_SEEDS[0], best=False))
    assert best is None and epochs[4]["test_ek"] == 30.0 and epochs[4]["test_acc"] == 71.25


def test_parse_worklog_keeps_the_last_block_of_a_repeated_epoch():
    text = our_worklog([10.0, 20.0], best=False) + our_worklog([30.0], best=False).replace("epoch: 1", "epoch: 2")
    epochs, _ = parse_worklog(text)
    assert [values["test_acc"] for values in epochs.values()] == [10.0, 30.0]


def test_folder_names_as_upstream_builds_them():
    assert split_overrides("kd,res56,res20SOLVER.LR:0.1,EXPERIMENT.SEED:2") == (
        "kd,res56,res20", ["SOLVER.LR:0.1", "EXPERIMENT.SEED:2"])
    assert split_overrides("dkd,wrn_40_2,wrn_16_2") == ("dkd,wrn_40_2,wrn_16_2", [])
    names = ("res56", "res8x4", "res50", "res34", "resnet34", "resnet110", "mv2", "shuv2", "wrn_40_2")
    assert [canonical_model(name) for name in names] == [
        "resnet56", "resnet8x4", "ResNet50", "ResNet34", "ResNet34", "resnet110", "MobileNetV2", "ShuffleV2", "wrn_40_2"]


def test_run_from_folder_name_or_config(results):
    upstream = read_run(str(results / "upstream" / "cifar100_baselines" / "vanilla,res56,res20"))
    assert (upstream.dataset, upstream.method, upstream.teacher, upstream.student) == (
        "cifar100", "vanilla", None, "resnet20")
    assert upstream.finished and upstream.source == "folder name"
    seed = read_run(str(results / "ours" / "cifar100_lakd" / "lakd,res56,res20EXPERIMENT.SEED:1"))
    assert (seed.method, seed.teacher, seed.student, seed.total_epochs) == ("LAKD", "resnet56", "resnet20", 4)
    assert seed.settings["SOLVER.LR"] == "0.05" and "EXPERIMENT.SEED" not in seed.settings
    assert seed.source == "config.yaml"
    tagged = read_run(write_run(results / "up" / "kd,res56,res20SOLVER.LR:0.1,EXPERIMENT.SEED:3", upstream_worklog([1.0])))
    assert tagged.settings == {"SOLVER.LR": "0.1"}
    going = read_run(str(results / "ours" / "cifar100_lakd" / "lakd,res56,res20SOLVER.LR:0.1"))
    assert not going.finished and going.progress == "epoch 2/4"


def test_table_numbers(results, capsys):
    assert compare_main([str(results / "upstream"), str(results / "ours")]) == 0
    out, err = capsys.readouterr()
    rows = {(row[2], row[3], row[4]): row for row in table_rows(out)}

    seeds_best = [max(accs) for accs in OURS_SEEDS]
    seeds_last = [accs[-1] for accs in OURS_SEEDS]
    # Runs of one method and pair are told apart by the config keys in which they differ.
    lakd = rows[("LAKD", "SOLVER.LR=0.05", "config.yaml")]
    assert lakd[1] == "resnet56 → resnet20" and lakd[5] == "2"
    assert lakd[6] == f"{statistics.fmean(seeds_best):.2f} ± {statistics.stdev(seeds_best):.2f}" == "71.75 ± 0.35"
    assert lakd[7] == f"{statistics.fmean(seeds_last):.2f} ± {statistics.stdev(seeds_last):.2f}"
    # The delta is taken to our own from-scratch student (read the same way, from its config).
    assert lakd[8] == f"{statistics.fmean(seeds_best) - max(OURS_VANILLA):+.2f}" == "+2.25"
    assert lakd[9] == "done"

    kd = rows[("KD", "", "folder name")]
    assert kd[6:10] == ["70.25", "70.00", f"{70.25 - 69.0:+.2f}", "done"]
    assert rows[("vanilla", "", "folder name")][8] == ""  # no delta for the reference itself

    going = rows[("LAKD", "SOLVER.LR=0.1", "config.yaml")]
    assert going[6:8] == ["60.00", "60.00"] and going[9] == "in progress (epoch 2/4)"

    assert "empty: worklog.txt holds no epoch with a test_acc line" in err
    assert "garbage: worklog.txt holds no epoch" in err


FEATURE_BASELINES = ["reviewkd", "vid", "pkt", "sp", "nst", "kdsvd"]


def test_upstreams_six_feature_baselines_are_rows_against_the_scratch_student(tmp_path, capsys):
    # upstream's run folders (its tags) and one of ours, read from its config
    upstream = tmp_path / "upstream" / "cifar100_baselines"
    for i, method in enumerate(FEATURE_BASELINES):
        write_run(upstream / f"{method},res32x4,res8x4", upstream_worklog([70.0, 72.0 + i]))
    write_run(upstream / "vanilla,res8x4", upstream_worklog([70.0, 71.0]))
    write_run(tmp_path / "ours" / "reviewkd,resnet56,resnet20", our_worklog([60.0, 70.5]), our_config("REVIEWKD", 2))
    write_run(tmp_path / "ours" / "vanilla,resnet20", our_worklog([60.0, 69.0]), our_config("NONE", 2))
    assert compare_main([str(tmp_path / "upstream"), str(tmp_path / "ours")]) == 0
    rows = {(row[1], row[2]): row for row in table_rows(capsys.readouterr()[0])}
    for i, method in enumerate(FEATURE_BASELINES):
        assert rows[("resnet32x4 → resnet8x4", method.upper())][6:10] == [
            f"{72.0 + i:.2f}", f"{72.0 + i:.2f}", f"{72.0 + i - 71.0:+.2f}", "done"]
    assert rows[("resnet56 → resnet20", "REVIEWKD")][4] == "config.yaml"
    assert rows[("resnet56 → resnet20", "REVIEWKD")][8] == "+1.50"


def test_csv_has_the_table_numbers(results, tmp_path, capsys):
    table = tmp_path / "table.csv"
    assert compare_main([str(results / "ours" / "cifar100_lakd"), "--csv", str(table)]) == 0
    with open(table) as f:
        records = {(r["method"], r["variant"]): r for r in csv.DictReader(f)}
    lakd = records[("LAKD", "SOLVER.LR=0.05")]
    seeds_best = [max(accs) for accs in OURS_SEEDS]
    assert float(lakd["best_mean"]) == pytest.approx(statistics.fmean(seeds_best))
    assert float(lakd["best_std"]) == pytest.approx(statistics.stdev(seeds_best))
    assert float(lakd["delta_best"]) == pytest.approx(statistics.fmean(seeds_best) - max(OURS_VANILLA))
    assert lakd["runs"] == "2" and len(lakd["folders"].split(";")) == 2
    assert records[("vanilla", "")]["best_std"] == "" and records[("vanilla", "")]["delta_best"] == ""


def test_unreadable_folders_are_skipped_not_fatal(tmp_path, capsys):
    write_run(tmp_path / "kd,res56,res20", upstream_worklog([1.0]))
    missing = str(tmp_path / "nowhere")
    assert compare_main([missing, str(tmp_path / "kd,res56,res20")]) == 0
    assert f"skipped {missing}: not a folder" in capsys.readouterr().err
    assert compare_main([missing]) == 1
    assert "no readable run" in capsys.readouterr().err


def test_plot_writes_the_accuracy_curves(results, tmp_path):
    image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    from mdistiller_lakd.analysis.figures import CURVE_PANEL
    from mdistiller_lakd.analysis.plotting import DPI

    plot = tmp_path / "curves.png"
    assert compare_main([str(results / "ours"), "--plot", str(plot)]) == 0
    # One panel per dataset and student: every readable run of `ours` trains resnet20 on cifar100.
    with image.open(plot) as png:
        assert png.size == (int(CURVE_PANEL[0] * DPI), int(CURVE_PANEL[1] * DPI))


def test_plot_without_matplotlib_names_the_extra(results, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert compare_main([str(results / "ours"), "--plot", str(tmp_path / "x.png")]) == 2
    assert 'pip install -e ".[viz]"' in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cat_kd_folders_need_their_config(tmp_path, capsys):
    """CAT-KD names runs by NAME ("res56_res20"): read with the config copied in, else skipped."""
    run = write_run(tmp_path / "res56_res20" / "res56_res20", upstream_worklog(UPSTREAM_KD))
    assert compare_main([str(tmp_path)]) == 1
    assert "copy the config the run was trained with into the folder as config.yaml" in capsys.readouterr().err
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write('DISTILLER:\n  TYPE: "CAT-KD"\n  TEACHER: "resnet56"\n  STUDENT: "resnet20"\n'
                "SOLVER:\n  EPOCHS: 4\nif_test: True\ndevice: 0\n")
    assert compare_main([str(tmp_path)]) == 0
    assert table_rows(capsys.readouterr().out)[0][1:3] == ["resnet56 → resnet20", "CAT_KD"]
