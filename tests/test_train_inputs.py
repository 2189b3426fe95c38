"""tools/train.py as a new user meets it: a long override list, a malformed config file and values
outside their range each get a clear answer (the run, or exit 2 naming the file or key)."""
import os
import runpy
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from mdistiller_lakd.engine.cfg import CFG, ConfigError, check_values, load_cfg
from mdistiller_lakd.engine.utils import MAX_NAME_BYTES, experiment_name

VANILLA_CIFAR10 = os.path.join(REPO_ROOT, "configs", "cifar10", "vanilla", "resnet56.yaml")


def train(*args: str, cwd: str = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "train.py"), *args],
                          cwd=cwd, capture_output=True, text=True)


def long_overrides(root: str, prefix: str, lr: str) -> list[str]:
    """A dozen overrides, as the issue's user gave them: the folder name passes 255 bytes."""
    return [
        "DATASET.TYPE", "cifar10", "DATASET.ROOT", root, "DATASET.NUM_WORKERS", "0", "LOG.PREFIX", prefix,
        "DISTILLER.STUDENT", "resnet8", "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "25",
        "DATASET.TEST.BATCH_SIZE", "20", "SOLVER.LR_DECAY_RATE", "0.2",
        "SOLVER.WEIGHT_DECAY", "0.0005", "SOLVER.MOMENTUM", "0.8", "SOLVER.NESTEROV", "True",
        "SOLVER.SCHEDULER", "step", "LAKD.LOCATIONS", "[1, 2, 3]", "LAKD.NDAM.AVG_WEIGHT", "0.25",
        "EXPERIMENT.TAG", "vanilla,resnet8,a_long_descriptive_tag_for_this_experiment", "SOLVER.LR", lr,
    ]


def test_long_override_lists_train_in_distinct_folders_that_compare_tells_apart(cifar10_root, tmp_path, capsys):
    prefix = str(tmp_path / "out")
    folders = []
    for lr in ("0.05", "0.02"):  # the names differ in their last override only
        opts = long_overrides(cifar10_root, prefix, lr)
        assert len(experiment_name(load_cfg(VANILLA_CIFAR10, opts), opts)) > MAX_NAME_BYTES  # unshortened
        result = train("--cfg", VANILLA_CIFAR10, *opts)
        assert result.returncode == 0, result.stderr
        folder = next(line for line in result.stdout.splitlines() if "Run folder: " in line).split("Run folder: ")[1]
        folder = folder.replace("\033[0m", "")
        assert os.path.isfile(os.path.join(folder, "worklog.txt"))
        assert len(os.path.basename(folder).encode()) <= MAX_NAME_BYTES
        assert os.path.basename(folder).startswith("vanilla,resnet8,a_long_descriptive_tag_for_this_experiment")
        saved = load_cfg(os.path.join(folder, "config.yaml"))  # every override is kept there
        assert (saved.SOLVER.LR, saved.SOLVER.MOMENTUM, list(saved.LAKD.LOCATIONS)) == (float(lr), 0.8, [1, 2, 3])
        folders.append(folder)
    assert len(set(folders)) == 2

    compare_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "compare.py"))["main"]
    assert compare_main([prefix]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| cifar10 | resnet8 |" in line]
    assert len(rows) == 2
    assert sorted("SOLVER.LR=0.02" in row for row in rows) == [False, True]
    assert sorted("SOLVER.LR=0.05" in row for row in rows) == [False, True]


def test_short_names_stay_upstreams_and_long_ones_are_cut_deterministically():
    cfg = load_cfg(None, ["EXPERIMENT.TAG", "kd,res56,res20"])
    assert experiment_name(cfg, ["SOLVER.LR", "0.1", "LOG.PREFIX", "x"]) == "distill/kd,res56,res20SOLVER.LR:0.1"
    long = ["LAKD.NDAM.AVG_WEIGHT", "0." + "3" * 300]
    name = experiment_name(cfg, long)
    assert name == experiment_name(cfg, long) and len(name.encode()) == len("distill/") + MAX_NAME_BYTES
    assert name.startswith("distill/kd,res56,res20LAKD.NDAM.AVG_WEIGHT:0.333")
    assert name != experiment_name(cfg, ["LAKD.NDAM.AVG_WEIGHT", "0." + "3" * 299 + "4"])
    # A cut through a multi-byte character drops that character, never writes half of it.
    folder = experiment_name(load_cfg(None, ["EXPERIMENT.TAG", "é" * 200]), []).split("/", 1)[1]
    start, digest = folder.rsplit(",", 1)
    assert start == "é" * ((MAX_NAME_BYTES - 13) // 2) and len(digest) == 12


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("DISTILLER:\n  TYPE: KD\nSOLVER:\n  LR: 0.1\n   EPOCHS: 2\n")
    result = train("--cfg", str(path))
    assert result.returncode == 2
    assert f"{path}, line 5: not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_a_yaml_file_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- SOLVER.LR\n- 0.1\n")
    with pytest.raises(ConfigError, match=f"^{path}: a config file is a mapping"):
        load_cfg(str(path))


# The three, through tools/train.py: exit 2 naming the key, before any data is read.
@pytest.mark.parametrize("key, value, message", [
    ("SOLVER.BATCH_SIZE", "0", "SOLVER.BATCH_SIZE: must be >= 1, got 0"),
    ("DATASET.NUM_WORKERS", "-1", "DATASET.NUM_WORKERS: must be >= 0, got -1"),
    ("SOLVER.EPOCHS", "0", "SOLVER.EPOCHS: must be >= 1, got 0"),
])
def test_bad_values_stop_train_before_any_data_is_read(tmp_path, key, value, message):
    data = tmp_path / "data"  # DOWNLOAD True: reading data would start a download into it
    result = train("--cfg", VANILLA_CIFAR10, key, value, "DATASET.ROOT", str(data), "LOG.PREFIX", str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"error: {message}" in result.stderr and "Traceback" not in result.stderr
    assert not data.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("opts, message", [
    (["SOLVER.LR", "0.0"], "SOLVER.LR: must be > 0, got 0.0"),
    (["DATASET.TEST.BATCH_SIZE", "0"], "DATASET.TEST.BATCH_SIZE: must be >= 1"),
    (["SOLVER.MOMENTUM", "1.0"], "SOLVER.MOMENTUM: must be in [0, 1)"),
    (["SOLVER.SCHEDULER", "exp"], "SOLVER.SCHEDULER: must be one of step, linear, cosine, got 'exp'"),
    (["SOLVER.LR_DECAY_STAGES", "[3, 2]"], "SOLVER.LR_DECAY_STAGES: must be strictly increasing whole epochs >= 1"),
    (["SOLVER.LR_DECAY_STAGES", "[0]"], "SOLVER.LR_DECAY_STAGES: must be strictly increasing whole epochs >= 1"),
    (["SOLVER.LR_DECAY_STAGES", "[1.5]"], "SOLVER.LR_DECAY_STAGES: must be strictly increasing whole epochs >= 1"),
    (["KD.LOSS.KD_WEIGHT", "-0.9"], "KD.LOSS.KD_WEIGHT: a weight must be a number >= 0, got -0.9"),
    (["CAT_KD.LOSS.CAT_loss_weight", "-1.0"], "CAT_KD.LOSS.CAT_loss_weight: a weight must be"),
    (["DKD.BETA", "-1.0", "DKD.CE_WEIGHT", "-1.0"], "DKD.CE_WEIGHT: a weight must be"),
    (["LAKD.LOSS.FEAT_WEIGHT", "-100.0"], "LAKD.LOSS.FEAT_WEIGHT: a weight must be"),
    (["LAKD.NDAM.MAX_WEIGHT", "-0.7"], "LAKD.NDAM.MAX_WEIGHT: a weight must be"),
    (["LAKD.LOSS.CAM_RESOLUTION", "0"], "LAKD.LOSS.CAM_RESOLUTION: must be >= 1, got 0"),
    (["LAKD.LOCATIONS", "[4, 1, 9]"], "LAKD.LOCATIONS: must be strictly increasing block numbers >= 1"),
    (["LAKD.LOCATIONS", "[0, 9]"], "LAKD.LOCATIONS: must be strictly increasing"),
    (["LAKD.TEACHER_STAGES", "[1, -1]"], "LAKD.TEACHER_STAGES: must be indices >= 0"),
    (["LAKD.BACKWARD", "lazy"], "LAKD.BACKWARD: must be one of eager, joint, got 'lazy'"),
])
def test_each_checked_value_is_named_with_its_full_key(opts, message):
    with pytest.raises(ConfigError) as info:
        check_values(load_cfg(None, opts))
    assert str(info.value).startswith(message)


def test_every_weight_key_of_any_node_is_checked(monkeypatch):
    # A method node added later is covered by its name alone.
    monkeypatch.setitem(CFG, "NEWKD", CFG.KD.clone())
    cfg = CFG.clone()
    cfg.NEWKD.LOSS.KD_WEIGHT = -2.0
    with pytest.raises(ConfigError, match=r"^NEWKD\.LOSS\.KD_WEIGHT: a weight must be a number >= 0, got -2.0"):
        check_values(cfg)


def test_defaults_and_shipped_configs_pass_the_checks():
    import glob

    check_values(CFG)
    for path in glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True):
        if os.sep + "grids" + os.sep not in path:  # grid files list configs (tools/grid.py)
            check_values(load_cfg(path))
    check_values(load_cfg(None, ["SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]"]))
    check_values(load_cfg(None, ["SOLVER.EPOCHS", "2", "SOLVER.SCHEDULER", "cosine"]))  # stages unused


def test_decay_stages_past_the_last_epoch_warn_naming_the_idle_ones():
    cfg = load_cfg(None, ["SOLVER.EPOCHS", "180", "SOLVER.LR_DECAY_STAGES", "[150, 180, 210]"])
    with pytest.warns(UserWarning) as caught:
        check_values(cfg)
    assert [str(w.message) for w in caught] == [
        "SOLVER.LR_DECAY_STAGES: [180, 210] at or past the last epoch (SOLVER.EPOCHS 180) never lower the learning rate"
    ]


def test_a_short_trial_of_a_shipped_config_trains_with_one_warning_line(cifar100_root, tmp_path):
    """Upstream's first command, shortened to one epoch: the 240-epoch decay stages never act."""
    config = os.path.join(REPO_ROOT, "configs", "cifar100", "vanilla", "resnet20.yaml")
    result = train("--cfg", config, "SOLVER.EPOCHS", "1", "DISTILLER.STUDENT", "resnet8", "SOLVER.BATCH_SIZE", "32",
                   "DATASET.ROOT", cifar100_root, "DATASET.DOWNLOAD", "False", "DATASET.NUM_WORKERS", "0",
                   "LOG.PREFIX", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if "LR_DECAY_STAGES" in line]
    assert warning_lines == [
        "warning: SOLVER.LR_DECAY_STAGES: [150, 180, 210] at or past the last epoch (SOLVER.EPOCHS 1) never lower "
        "the learning rate"
    ]
    worklogs = [os.path.join(root, "worklog.txt") for root, _, files in os.walk(tmp_path / "out") if "worklog.txt" in files]
    with open(worklogs[0]) as f:
        assert "epoch: 1\nlr: 0.05\n" in f.read() and len(worklogs) == 1


def test_options_after_the_overrides_are_read_as_options():
    """The previous command with ``--resume`` appended, as upstream users retype it."""
    parse_arguments = runpy.run_path(os.path.join(REPO_ROOT, "tools", "train.py"))["parse_arguments"]
    args = parse_arguments(["--cfg", "a.yaml", "SOLVER.EPOCHS", "1", "--resume", "SOLVER.LR", "-1", "--name", "x"])
    assert (args.cfg, args.resume, args.name, args.opts) == ("a.yaml", True, "x", ["SOLVER.EPOCHS", "1", "SOLVER.LR", "-1"])
    args = parse_arguments(["--cfg", "a.yaml", "EXPERIMENT.TAG", "--resume"])  # a value, not an option
    assert (args.resume, args.opts) == (False, ["EXPERIMENT.TAG", "--resume"])
    with pytest.raises(SystemExit):
        parse_arguments(["--cfg", "a.yaml", "SOLVER.EPOCHS", "1", "--no-such-option"])
