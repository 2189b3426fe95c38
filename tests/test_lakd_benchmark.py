"""tools/benchmark.py's measurement, in this process: a method built from its shipped config runs
the trainer's step and reports its median step time and its peak memory."""
import os
import runpy

import torch

from conftest import REPO_ROOT


def test_benchmark_measures_a_method_from_its_config():
    benchmark = runpy.run_path(os.path.join(REPO_ROOT, "tools", "benchmark.py"))
    result = benchmark["measure"]("lakd_eager", "res56_res20", 2, 1, 1, torch.device("cpu"))
    assert result["method"] == "lakd_eager" and result["step_ms"] > 0 and result["peak_mib"] >= 0
    assert set(benchmark["METHODS"]) == {
        "scratch", "kd", "cat_kd", "fitnet", "lakd_eager", "lakd_joint", "nkd", "uskd", "pskd",
    }
