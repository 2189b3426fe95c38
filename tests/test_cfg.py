import pytest

from mdistiller_lakd.engine.cfg import CFG, ConfigError, check_values, load_cfg


def test_upstream_style_config_loads(tmp_path):
    # The shape of a config of upstream mdistiller's cifar100 tree (KD, res56 -> res20).
    path = tmp_path / "kd.yaml"
    path.write_text(
        'EXPERIMENT:\n  NAME: ""\n  TAG: "kd,res56,res20"\n  PROJECT: "cifar100_baselines"\n'
        'DISTILLER:\n  TYPE: "KD"\n  TEACHER: "resnet56"\n  STUDENT: "resnet20"\n'
        "SOLVER:\n  BATCH_SIZE: 64\n  EPOCHS: 240\n  LR: 0.05\n  LR_DECAY_STAGES: [150, 180, 210]\n"
        '  LR_DECAY_RATE: 0.1\n  WEIGHT_DECAY: 0.0005\n  MOMENTUM: 0.9\n  TYPE: "SGD"\n'
        "KD:\n  TEMPERATURE: 4\n  LOSS:\n    CE_WEIGHT: 0.1\n    KD_WEIGHT: 0.9\n"
    )
    cfg = load_cfg(str(path))
    assert cfg.DISTILLER.TYPE == "KD"
    assert cfg.SOLVER.WEIGHT_DECAY == 0.0005
    assert cfg.KD.LOSS.KD_WEIGHT == 0.9
    assert cfg.is_frozen()


def test_cat_kd_style_config_loads(tmp_path):
    # CAT-KD's configs add top-level keys (if_test, device) and its own node.
    path = tmp_path / "cat.yaml"
    path.write_text(
        'DISTILLER:\n  TYPE: "CAT_KD"\n  TEACHER: "resnet56"\n  STUDENT: "resnet20"\n'
        "CAT_KD:\n  LOSS:\n    CAT_loss_weight: 0.7\n    CAM_RESOLUTION: 2\n    CE_WEIGHT: 1.\n"
        "  onlyCAT: False\n  IF_NORMALIZE: False\nif_test: True\ndevice: 0\n"
    )
    cfg = load_cfg(str(path))
    assert cfg.CAT_KD.LOSS.CAT_loss_weight == 0.7
    assert cfg.CAT_KD.IF_NORMALIZE is False


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("SOLVER:\n  LEARNING_RATE: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_cfg(str(path))
    assert "SOLVER.LEARNING_RATE" in str(info.value)
    assert str(path) in str(info.value)


def test_override_unknown_key_named():
    with pytest.raises(ConfigError, match="SOLVER.NOPE"):
        load_cfg(None, ["SOLVER.NOPE", "1"])


def test_override_wrong_type_named():
    with pytest.raises(ConfigError, match="SOLVER.EPOCHS"):
        load_cfg(None, ["SOLVER.EPOCHS", "'many'"])


def test_whole_numbers_override_float_keys_and_are_still_range_checked():
    cfg = load_cfg(None, ["SOLVER.LR", "1", "LAKD.LOSS.CAT_WEIGHT", "0", "SOLVER.EPOCHS", "3"])
    assert (cfg.SOLVER.LR, cfg.LAKD.LOSS.CAT_WEIGHT, cfg.SOLVER.EPOCHS) == (1.0, 0.0, 3)
    assert isinstance(cfg.SOLVER.LR, float) and isinstance(cfg.SOLVER.EPOCHS, int)
    with pytest.raises(ConfigError, match="LAKD.LOSS.CAT_WEIGHT"):
        check_values(load_cfg(None, ["LAKD.LOSS.CAT_WEIGHT", "-1"]))
    with pytest.raises(ConfigError, match="SOLVER.LR"):  # a string stays a type error
        load_cfg(None, ["SOLVER.LR", "'fast'"])


def test_overrides_apply_and_defaults_are_ours():
    cfg = load_cfg(None, ["SOLVER.EPOCHS", "3", "LAKD.LOCATIONS", "[1, 2, 9]"])
    assert cfg.SOLVER.EPOCHS == 3
    assert list(cfg.LAKD.LOCATIONS) == [1, 2, 9]
    assert CFG.LOG.WANDB is False and CFG.DATASET.ROOT == "./data"
    assert CFG.SOLVER.SCHEDULER == "step" and CFG.DISTILLER.TEACHER_CKPT == ""


def test_non_yaml_config_rejected(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_cfg(str(path))
