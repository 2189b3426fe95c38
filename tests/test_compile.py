"""SOLVER.COMPILE: the values it takes, the eager fallback without a compiler, and compiled training
steps equal to eager ones (inductor, the backend users get).

Tolerance: a compiled step reorders float32 reductions (BatchNorm statistics, convolution and
softmax sums) and fuses kernels, which moves results by a few float32 ulps per operation, ~1e-6 to
1e-5 relative after the network's depth. Losses are compared with rtol 1e-4; each gradient tensor
with rtol 1e-4 plus an atol of 1e-4 times its largest magnitude, since elementwise relative errors
of entries near zero (cancellations in a sum) are not bounded by the tensor's precision. A wrong
graph (a missing term, a detached feature, a hook not firing) moves them by far more.

These are the slowest tests of the suite (each compile takes tens of seconds on two cores); the
models are resnet8 and resnet14 on batches of 4 images.
"""
import re
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from mdistiller_lakd.distillers import distiller_dict
from mdistiller_lakd.engine import compile as compile_module
from mdistiller_lakd.engine.build import make_distiller
from mdistiller_lakd.engine.cfg import ConfigError, check_values, load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint
from mdistiller_lakd.engine.trainer import Trainer
from mdistiller_lakd.models import cifar_model_dict

NUM_DATA = 10


def cfg_opts(method: str, opts) -> list:
    return ["DISTILLER.TYPE", method, "LAKD.LOCATIONS", "[1, 2, 3]", *opts]


def make(method: str, *opts):
    cfg = load_cfg(None, cfg_opts(method, opts))
    torch.manual_seed(0)
    teacher = cifar_model_dict["resnet14"][0](num_classes=100) if distiller_dict[method].requires_teacher else None
    torch.manual_seed(1)
    student = cifar_model_dict["resnet8"][0](num_classes=100)
    return make_distiller(cfg, student, teacher, NUM_DATA, 100)


def trainer_for(method: str, log_prefix, compiled, *opts) -> Trainer:
    distiller = make(method, *opts)
    cfg = load_cfg(None, [*cfg_opts(method, opts), "LOG.PREFIX", str(log_prefix), "SOLVER.COMPILE", compiled])
    return Trainer("run", distiller, [], [], cfg, torch.device("cpu"))


def batch(size=4):
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 100, (size,), generator=generator),
            torch.arange(size))


@pytest.mark.parametrize("value", ["True", "False", "default", "reduce-overhead", "max-autotune"])
def test_compile_takes_a_bool_or_a_mode_from_the_command_line(value):
    cfg = load_cfg(None, ["SOLVER.COMPILE", value])
    check_values(cfg)
    assert compile_module.compile_mode(cfg.SOLVER.COMPILE) == {"True": "default", "False": None}.get(value, value)


def test_compile_from_a_yaml_file_and_a_wrong_value_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("SOLVER:\n  COMPILE: reduce-overhead\n")
    assert load_cfg(str(path)).SOLVER.COMPILE == "reduce-overhead"
    assert load_cfg(None).SOLVER.COMPILE is False
    for wrong in ("fast", "1"):
        with pytest.raises(ConfigError, match=r"SOLVER.COMPILE: must be False, True or one of default, "):
            check_values(load_cfg(None, ["SOLVER.COMPILE", wrong]))


def test_without_a_cpp_compiler_the_run_warns_and_trains_eagerly(tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    reason = "no C++ compiler found (g++ or clang++ or c++)"
    with pytest.warns(UserWarning, match=re.escape(f"SOLVER.COMPILE True: {reason}; training eagerly")):
        trainer = trainer_for("KD", tmp_path, True)
    assert "forward_train" not in vars(trainer.distiller)  # the class's method: nothing compiled
    assert trainer.compile_report == f"nothing compiled ({reason}); training eagerly"


def test_plans_name_what_each_method_compiles():
    kd, lakd_eager, lakd_joint, uskd = (make(m, *o) for m, o in [
        ("KD", []), ("LAKD", []), ("LAKD", ["LAKD.BACKWARD", "joint"]), ("USKD", [])])
    (target,), eager = kd.compile_plan()
    assert (target.name, target.owner, target.attribute, eager) == (
        "training forward (teacher, student, loss)", kd, "forward_train", "")
    assert uskd.compile_plan()[0][0].name == "training forward (student, loss)"
    assert lakd_joint.compile_plan()[0][0].owner is lakd_joint
    targets, eager = lakd_eager.compile_plan()
    blocks = [lakd_eager.student.layer1[0], lakd_eager.student.layer2[0], lakd_eager.student.layer3[0]]
    assert [(t.owner, t.attribute) for t in targets] == [(m, "forward") for m in [lakd_eager.teacher, *blocks]]
    assert "back-propagate inside the blocks' forward hooks" in eager


def train_step(trainer: Trainer):
    """One trainer step on the shared batch: its loss values and every learnable parameter's gradient."""
    trainer.model.train()
    _, _, losses = trainer.train_step(batch(), epoch=1, iteration=0)
    return losses, {name: p.grad.clone() for name, p in trainer.distiller.named_parameters() if p.grad is not None}


# KD, DKD, CAT-KD, LAKD (both backward modes), NKD and the teacherless USKD.
# KD with DOT back-propagates twice: its models are compiled alone.
EXACT = [("KD", []), ("DKD", []), ("CAT_KD", []), ("LAKD", ["LAKD.BACKWARD", "eager"]),
         ("LAKD", ["LAKD.BACKWARD", "joint"]), ("NKD", []), ("USKD", []), ("KD", ["SOLVER.TRAINER", "dot"])]


@pytest.mark.parametrize("method,opts", EXACT,
                         ids=["KD", "DKD", "CAT_KD", "LAKD-eager", "LAKD-joint", "NKD", "USKD", "KD-DOT"])
def test_a_compiled_step_equals_the_eager_step(method, opts, tmp_path):
    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_grads = train_step(trainer_for(method, tmp_path / "eager", False, *opts))
    compiled = trainer_for(method, tmp_path / "compiled", True, *opts)
    assert compiled.compile_report.startswith("compiled (default): ")
    losses, grads = train_step(compiled)
    assert counters["stats"]["unique_graphs"] >= 1  # compiled code ran, no eager fallback
    assert losses.keys() == eager_losses.keys()
    for key, value in eager_losses.items():
        assert losses[key] == pytest.approx(value, rel=1e-4), key
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)
    # The compiled functions live on their owners: the distiller's keys are the eager one's.
    assert list(compiled.distiller.state_dict()) == list(make(method, *opts).state_dict())


def loaders(num_train=NUM_DATA, batch_size=4):
    """A training loader whose last batch is partial (4, 4, 2) and a validation loader of one batch."""
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(num_train, 3, 32, 32, generator=generator)
    targets = torch.randint(0, 100, (num_train,), generator=generator)
    train = [(images[i:i + batch_size], targets[i:i + batch_size], torch.arange(i, min(i + batch_size, num_train)))
             for i in range(0, num_train, batch_size)]
    return train, [(images[:6], targets[:6])]


def run_cfg(log_prefix, compiled, epochs):
    return load_cfg(None, ["DISTILLER.TYPE", "KD", "LOG.PREFIX", str(log_prefix), "SOLVER.COMPILE", compiled,
                           "SOLVER.EPOCHS", epochs, "SOLVER.BATCH_SIZE", 4,
                           "SOLVER.CHANNELS_LAST", True])


def test_a_compiled_run_compiles_once_per_shape_and_its_checkpoints_resume_eagerly(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    train, val = loaders()
    Trainer("run", make("KD"), train, val, run_cfg(tmp_path, True, 2), torch.device("cpu")).train()
    # Six steps over two epochs: the full batch of 4, then once more for the partial batch of 2,
    # whose recompile makes the batch dimension dynamic. Validation runs the eager forward_test.
    assert counters["stats"]["unique_graphs"] == 2
    run = tmp_path / "run"
    with open(run / "worklog.txt") as worklog:
        lines = worklog.read().splitlines()
    assert lines[0] == "compile: compiled (default): training forward (teacher, student, loss); eager: nothing"
    assert sum(line.startswith("epoch: ") for line in lines) == 2

    # Checkpoints hold the models' own keys, and an eager run resumes from them.
    fresh = make("KD")
    state, student = load_checkpoint(str(run / "latest")), load_checkpoint(str(run / "student_latest"))
    assert list(state["model"]) == list(fresh.state_dict())
    assert list(student["model"]) == list(fresh.student.state_dict())
    eager = Trainer("run", fresh, train, val, run_cfg(tmp_path, False, 3), torch.device("cpu"))
    eager.train(resume=True)
    assert load_checkpoint(str(run / "latest"))["epoch"] == 3
    assert torch.equal(eager.distiller.teacher.fc.weight, state["model"]["teacher.fc.weight"])
    assert not torch.equal(eager.distiller.student.fc.weight, student["model"]["fc.weight"])  # it trained on
    assert counters["stats"]["unique_graphs"] == 2  # the eager run compiled nothing
    with open(run / "worklog.txt") as worklog:
        assert worklog.read().count("compile: ") == 1  # the eager run reports nothing
