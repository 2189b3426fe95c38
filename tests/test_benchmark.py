"""tools/benchmark.py: the data-pipeline comparison, the trainer's step under AMP and channels_last,
and the ratios to from-scratch training."""
import importlib.util
import json
import os

import pytest
import torch
import torch.nn as nn

from conftest import REPO_ROOT
from fake_cifar import write_cifar


@pytest.fixture
def bench_tool():
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(REPO_ROOT, "tools", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_mode_times_both_pipelines_on_the_given_root(bench_tool, tmp_path, capsys):
    write_cifar(str(tmp_path), "cifar100", num_train=48, num_test=8)
    args = ["--data", "--data-root", str(tmp_path), "--batch-size", "16", "--data-batches", "2", "--workers", "0"]
    assert bench_tool.main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == str(tmp_path) and report["batch_size"] == 16
    speeds = report["images_per_s"]
    assert set(speeds) == {"torchvision", "tensor"} and min(speeds.values()) > 0
    assert report["tensor_vs_torchvision"] == pytest.approx(speeds["tensor"] / speeds["torchvision"])


def test_a_method_is_timed_through_the_trainer_step_with_amp_and_channels_last(bench_tool):
    seen = []

    def record(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            seen.append((output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        result = bench_tool.measure("scratch", "res56_res20", 2, 1, 0, torch.device("cpu"), "bf16", True)
    finally:
        handle.remove()
    assert set(seen) == {(torch.bfloat16, True)}
    assert result["images_per_s"] == pytest.approx(2 / (result["step_ms"] / 1000))
    assert result["peak_mib"] >= 0


def test_methods_are_reported_against_training_from_scratch(bench_tool, monkeypatch, capsys):
    costs = {"scratch": (10.0, 100.0), "kd": (15.0, 120.0), "lakd_eager": (20.0, 80.0)}

    def fake_run(method, args, compiled=False):
        step_ms, peak_mib = costs[method]
        return {"method": method, "step_ms": step_ms, "images_per_s": 1000 * args.batch_size / step_ms,
                "peak_mib": peak_mib}

    monkeypatch.setattr(bench_tool, "run_in_fresh_process", fake_run)
    assert bench_tool.main(["--methods", "lakd_eager", "kd", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["method"] for r in results] == ["scratch", "lakd_eager", "kd"]
    assert [(r["time_vs_scratch"], r["memory_vs_scratch"]) for r in results] == [(1.0, 1.0), (2.0, 0.8), (1.5, 1.2)]
    assert list(bench_tool.METHODS) == [
        "scratch", "kd", "at", "fitnet", "rkd", "ofd", "crd", "dkd", "cat_kd", "acam_kd", "lakd_eager", "lakd_joint",
        "nkd", "uskd", "pskd", "reviewkd", "vid", "pkt", "sp", "nst", "kdsvd", "kd_dot",
    ]


def test_memory_is_also_reported_against_cat_kd_when_it_is_measured(bench_tool, monkeypatch, capsys):
    peaks = {"scratch": 100.0, "cat_kd": 125.0, "lakd_eager": 80.0}
    monkeypatch.setattr(bench_tool, "run_in_fresh_process", lambda method, args, compiled=False: {
        "method": method, "step_ms": 10.0, "images_per_s": 1.0, "peak_mib": peaks[method]})
    assert bench_tool.main(["--methods", "cat_kd", "lakd_eager", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [(r["method"], r["memory_vs_cat_kd"]) for r in results] == [
        ("scratch", 0.8), ("cat_kd", 1.0), ("lakd_eager", 0.64)
    ]
    assert bench_tool.main(["--methods", "cat_kd", "lakd_eager"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-1] == "0.64"


def test_cuda_report_without_cuda_exits_with_a_message(bench_tool, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_tool.main(["--cuda-report"]) == 2
    assert "--cuda-report needs a CUDA GPU" in capsys.readouterr().err


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_cuda" name="test_step[KD-fp32]" time="0.1"/>
<testcase classname="tests.test_cuda" name="test_step[KD-fp16]" time="0.1">
<failure message="AssertionError: scale halved&#10;second line">trace</failure></testcase>
<testcase classname="tests.test_cuda" name="test_nccl" time="0.0">
<skipped type="pytest.skip" message="needs 2 GPUs">skip</skipped></testcase>
</testsuite></testsuites>"""


def test_cuda_report_prints_test_outcomes_and_the_cuda_benchmark_in_one_table(bench_tool, monkeypatch, capsys):
    outcomes = bench_tool.junit_outcomes(bench_tool.ElementTree.fromstring(JUNIT))
    assert outcomes == [
        {"test": "test_step[KD-fp32]", "outcome": "passed", "message": ""},
        {"test": "test_step[KD-fp16]", "outcome": "failed", "message": "AssertionError: scale halved"},
        {"test": "test_nccl", "outcome": "skipped", "message": "needs 2 GPUs"},
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(bench_tool, "run_cuda_tests", lambda: outcomes)
    devices = set()

    def fake_run(method, args, compiled=False):
        devices.add(args.device)
        return {"method": method, "step_ms": 10.0, "images_per_s": 1.0, "peak_mib": 100.0 if method == "scratch" else 90.0,
                "peak_source": "torch.cuda.max_memory_allocated"}

    monkeypatch.setattr(bench_tool, "run_in_fresh_process", fake_run)
    assert bench_tool.main(["--cuda-report", "--steps", "3"]) == 1  # a test failed
    lines = capsys.readouterr().out.splitlines()
    assert devices == {"cuda"}
    assert lines[0].startswith("CUDA check on 1 x Fake GPU: tests/test_cuda.py, then res56_res20 at batch 128")
    assert [line.split()[:3] for line in lines[2:5]] == [
        ["test", "test_step[KD-fp32]", "passed"], ["test", "test_step[KD-fp16]", "failed:"],
        ["test", "test_nccl", "skipped:"],
    ]
    benchmarked = [line.split()[1] for line in lines[5:]]
    assert benchmarked == list(bench_tool.METHODS)
    eager = next(line for line in lines if line.startswith("benchmark lakd_eager"))
    assert "peak 90.0 MiB, 0.90x scratch, 1.00x cat_kd memory" in eager


@pytest.mark.parametrize("method,teacher", [("nkd", "resnet56"), ("uskd", None), ("pskd", None)])
def test_new_methods_build_on_the_pairs_student(bench_tool, method, teacher):
    distiller = bench_tool.build(method, "res56_res20")
    resnet20 = bench_tool.build("scratch", "res56_res20").student
    assert distiller.student.state_dict().keys() == resnet20.state_dict().keys()
    assert (distiller.teacher is None) == (teacher is None)
    if method == "pskd":
        assert distiller.predictions.shape == (50000, 100)  # CIFAR-100's training set


def test_saved_mode_counts_each_local_modules_saved_activations(bench_tool, capsys):
    # resnet20 at [1, 4, 9]. Module 2 runs layer1.1, layer1.2 (stage 1: 16 x 32 x 32) and layer2.0
    # (32 x 16 x 16). It saves its input, then per basic block conv1 out, relu out, conv2 out and
    # the block's relu out; layer2.0 also its shortcut conv out. Each BatchNorm adds its batch
    # mean and inverse std (2 x channels). Weights and running statistics are not counted.
    batch = 2
    stage1, stage2 = 16 * 32 * 32, 32 * 16 * 16
    activations = batch * ((1 + 2 * 4) * stage1 + 5 * stage2)
    norm_statistics = 2 * (4 * 16 + 3 * 32)
    assert bench_tool.main(["--saved", "--batch-size", str(batch), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    modules = report["modules"]
    assert [m["blocks"] for m in modules] == [[1, 1], [2, 4], [5, 9]]
    assert modules[1]["saved_mib"] * 2**20 == 4 * (activations + norm_statistics)
    shares = [m["saved_mib"] / report["whole_mib"] for m in modules]
    assert [m["share"] for m in modules] == pytest.approx(shares)
    assert report["floor"] == max(m["share"] for m in modules)
    # the cut features are saved by both neighbours, so the modules together exceed the whole
    assert sum(shares) > 1
    assert bench_tool.main(["--saved", "--batch-size", str(batch)]) == 0
    assert "floor of LAKD eager's peak memory / from-scratch: " in capsys.readouterr().out


def test_compile_mode_measures_every_method_eager_and_compiled(bench_tool, monkeypatch, capsys):
    step_ms = {("scratch", False): 10.0, ("scratch", True): 5.0, ("kd", False): 20.0, ("kd", True): 8.0}
    calls = []

    def fake_run(method, args, compiled=False):
        calls.append((method, compiled))
        return {"method": method, "compiled": compiled, "step_ms": step_ms[method, compiled], "images_per_s": 1.0,
                "compile_s": 30.0 if compiled else 0.0, "peak_mib": 100.0}

    monkeypatch.setattr(bench_tool, "run_in_fresh_process", fake_run)
    assert bench_tool.main(["--methods", "kd", "--compile", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert calls == list(step_ms)  # each method eager, then compiled, each in its own process
    assert [(r["method"], r["compiled"], r["step_ms"], r["compile_s"]) for r in results] == [
        ("scratch", False, 10.0, 0.0), ("scratch", True, 5.0, 30.0), ("kd", False, 20.0, 0.0), ("kd", True, 8.0, 30.0)]
    assert [r["time_vs_scratch"] for r in results] == [1.0, 1.0, 2.0, 1.6]  # within each mode
    assert bench_tool.main(["--methods", "kd", "--compile"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["kd", "20.0", "8.0", "2.50", "30.0"]
