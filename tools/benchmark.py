"""Training-step cost of distillation methods side by side: median step time and peak memory, and
both as ratios to training the student from scratch (the paper's Table 4 compares GPU memory).

    python tools/benchmark.py [--pair res56_res20] [--batch-size 128] [--steps 5] [--json]

Each method runs in a fresh process on random data with randomly initialised models (cost does not
depend on the weights): a trainer's step (zero_grad, forward, backward of the summed losses, SGD
step) after warm-up steps. Peak memory is the peak above the memory in use just before the step:
on CUDA the allocator's peak, on CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs), with glibc told to hand freed memory back at once so that resident memory
follows the tensors alive.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from mdistiller_lakd.distillers import Vanilla, distiller_dict
from mdistiller_lakd.engine.build import build_model
from mdistiller_lakd.engine.cfg import load_cfg

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (config folder under configs/cifar100, overrides); "scratch" is the student alone
METHODS = {
    "scratch": ("lakd", ["DISTILLER.TYPE", "NONE"]),
    "cat_kd": ("cat_kd", []),
    "fitnet": ("fitnet", []),
    "lakd_eager": ("lakd", ["LAKD.BACKWARD", "eager"]),
    "lakd_joint": ("lakd", ["LAKD.BACKWARD", "joint"]),
}
# Freed memory goes back to the OS at once (no trimming threshold, no growing mmap threshold).
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


class PeakMemory:
    """Bytes in use at the peak of a region, above those in use when it started."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets the peak resident set (VmHWM) to the current one
            self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def build(method: str, pair: str, num_classes: int = 100):
    folder, opts = METHODS[method]
    cfg = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", folder, f"{pair}.yaml"), opts)
    student = build_model(cfg.DISTILLER.STUDENT, "cifar100", num_classes, "DISTILLER.STUDENT")
    if cfg.DISTILLER.TYPE == "NONE":
        return Vanilla(student)
    teacher = build_model(cfg.DISTILLER.TEACHER, "cifar100", num_classes, "DISTILLER.TEACHER").eval()
    return distiller_dict[cfg.DISTILLER.TYPE](student, teacher, cfg)


def measure(method: str, pair: str, batch_size: int, steps: int, warmup: int, device: torch.device) -> dict:
    """Median step time and peak memory of ``method`` in this process."""
    torch.manual_seed(0)
    distiller = build(method, pair).to(device).train()  # a distiller keeps its teacher in eval mode
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.01, momentum=0.9)
    image = torch.randn(batch_size, 3, 32, 32, device=device)
    target = torch.randint(0, 100, (batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _, losses = distiller(image=image, target=target, epoch=1)
        sum(loss.mean() for loss in losses.values()).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    optimizer.zero_grad(set_to_none=True)
    memory = PeakMemory(device)
    memory.start()
    step()
    peak = memory.peak()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"method": method, "step_ms": 1000 * statistics.median(times), "peak_mib": peak / 2**20}


def run_in_fresh_process(method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--pair", args.pair,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **GLIBC_ENV})
    if result.returncode != 0:
        raise RuntimeError(f"benchmark of {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("training-step time and peak memory of distillation methods")
    parser.add_argument("--pair", default="res56_res20", help="a pair of configs/cifar100/<method>/")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = measure(args.worker, args.pair, args.batch_size, args.steps, args.warmup, torch.device(args.device))
        print(json.dumps(result))
        return 0

    methods = ["scratch"] + [m for m in args.methods if m != "scratch"]
    results = [run_in_fresh_process(method, args) for method in methods]
    scratch = results[0]
    for result in results:
        result["time_vs_scratch"] = result["step_ms"] / scratch["step_ms"]
        result["memory_vs_scratch"] = result["peak_mib"] / scratch["peak_mib"]
    if args.json:
        print(json.dumps({"pair": args.pair, "batch_size": args.batch_size, "device": args.device, "results": results}, indent=2))
        return 0
    print(f"{args.pair}, batch {args.batch_size}, {args.device}: median of {args.steps} steps, peak memory above the step's start")
    print(f"{'method':<12} {'step ms':>9} {'peak MiB':>9} {'time/scratch':>13} {'memory/scratch':>15}")
    for r in results:
        print(f"{r['method']:<12} {r['step_ms']:9.1f} {r['peak_mib']:9.1f} {r['time_vs_scratch']:13.2f} {r['memory_vs_scratch']:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
