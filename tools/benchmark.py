"""Training cost of distillation methods side by side, and the speed of the two CIFAR data pipelines.

    python tools/benchmark.py [--pair res56_res20] [--batch-size 128] [--steps 5] [--amp bf16] [--channels-last]
                              [--compile] [--json]
    python tools/benchmark.py --data [--batch-size 64] [--data-root ./data] [--json]
    python tools/benchmark.py --saved [--pair res56_res20] [--batch-size 128] [--json]
    python tools/benchmark.py --cuda-report [--pair res56_res20] [--batch-size 128] [--steps 5]

Methods (the paper's Table 4 compares GPU memory): each runs in a fresh process, on random data with
randomly initialised models (cost does not depend on the weights), through the trainer's own step
(forward under SOLVER.AMP, backward, gradient scaling, SGD). Reported: the median time of the timed
steps after the warm-up ones, images per second at that median, and the peak memory above what the
process held before its first step (CUDA: the allocator's peak; CPU: the peak resident set, VmHWM
reset through /proc/self/clear_refs, with glibc told to hand freed memory back at once so that
resident memory follows the tensors alive); each also as a ratio to training the student from
scratch, and to CAT-KD when it is measured (each within its mode).

--compile: every method also with SOLVER.COMPILE True (docs/compile.md), each mode in its own fresh
process of the same run: both step times, eager / compiled, and the one-off compilation time (the
first step's time above the median step's, with an empty inductor cache). ``--json`` gives one
record per method and mode, with ``compiled`` (bool) and ``compile_s`` (0 when eager).

--data: images per second that DATASET.PIPELINE "torchvision" (DataLoader, per-image PIL,
DATASET.NUM_WORKERS workers) and "tensor" (batched on the device) deliver onto the training device,
the first batch (worker start-up) untimed; on CIFAR-100 under --data-root when it is there, else
on random images written in the same file layout to a temporary folder.

--saved: the bytes the student alone saves for backward in one training forward, split into LAKD's
local modules at the pair's LAKD.LOCATIONS (stem with the first, head with the last) and for the
whole network, counted with torch.autograd.graph.saved_tensors_hooks (each storage once per module;
parameters and buffers left out). Eager LAKD holds one module's graph at a time, so the largest
module's share is the floor of its peak memory relative to training from scratch.

--cuda-report: the whole GPU check in one command: tests/test_cuda.py (every distiller's training
step on CUDA in fp32, bf16, fp16 and channels_last; the tensor pipeline on the device; this
benchmark on CUDA; NCCL ranks with two or more GPUs), then every method side by side on CUDA, as
one table. Exits 2 where CUDA is not available, 1 when a test failed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

import torch
import torch.nn.functional as F

from mdistiller_lakd.dataset import get_dataset
from mdistiller_lakd.distillers import distiller_dict
from mdistiller_lakd.engine.build import build_model, make_distiller
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.engine.trainer import Trainer
from mdistiller_lakd.export import IMAGE_SIZE, NUM_CLASSES
from mdistiller_lakd.lakd.blocks import find_blocks

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (config folder under configs/cifar100, overrides); "scratch" is the student alone
METHODS = {
    "scratch": ("lakd", ["DISTILLER.TYPE", "NONE"]),
    "kd": ("kd", []),
    "at": ("at", []),
    "fitnet": ("fitnet", []),
    "rkd": ("rkd", []),
    "ofd": ("ofd", []),
    "crd": ("crd", []),
    "dkd": ("dkd", []),
    "cat_kd": ("cat_kd", []),
    "acam_kd": ("acam_kd", []),
    "lakd_eager": ("lakd", ["LAKD.BACKWARD", "eager"]),
    "lakd_joint": ("lakd", ["LAKD.BACKWARD", "joint"]),
    "nkd": ("nkd", []),
    "uskd": ("uskd", []),  # teacherless: configs/cifar100/uskd/<the pair's student>.yaml
    "pskd": ("pskd", []),  # teacherless; its 50000 x 100 prediction buffer exists before the first step
    "reviewkd": ("reviewkd", []),
    "vid": ("vid", []),
    "pkt": ("pkt", []),
    "sp": ("sp", []),
    "nst": ("nst", []),
    "kdsvd": ("kdsvd", []),
    "kd_dot": ("dot/kd", []),  # KD trained with DOT: two backward passes a step
}
BENCHMARK_LR = 1e-4
CIFAR100_TRAIN_SIZE = 50000  # num_data of the methods that keep per-sample state (PS-KD's buffer)
PIPELINES = ("torchvision", "tensor")
# Freed memory goes back to the OS at once (no trimming threshold, no growing mmap threshold).
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Bytes in use at the peak of a region, above those in use when it started."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets the peak resident set (VmHWM) to the current one
            self.base = _status_kib("VmRSS") * 1024

    @property
    def source(self) -> str:
        """What the peak is read from."""
        return "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "VmHWM"

    def peak(self) -> int:
        synchronize(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def method_config(method: str, pair: str):
    """The shipped CIFAR-100 config of ``method`` for ``pair``; a teacherless method ships one per
    student, and gets the pair's student's."""
    folder, opts = METHODS[method]
    path = os.path.join(REPO_ROOT, "configs", "cifar100", folder, f"{pair}.yaml")
    if not os.path.isfile(path):
        student = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", "lakd", f"{pair}.yaml")).DISTILLER.STUDENT
        path = os.path.join(REPO_ROOT, "configs", "cifar100", folder, f"{student}.yaml")
    return load_cfg(path, opts)


def build(method: str, pair: str):
    """The method's distiller on the dataset of its config (random weights)."""
    cfg = method_config(method, pair)
    dataset = cfg.DATASET.TYPE
    num_classes = NUM_CLASSES[dataset]
    student = build_model(cfg.DISTILLER.STUDENT, dataset, num_classes, "DISTILLER.STUDENT")
    teacher = None
    if distiller_dict[cfg.DISTILLER.TYPE].requires_teacher:
        teacher = build_model(cfg.DISTILLER.TEACHER, dataset, num_classes, "DISTILLER.TEACHER").eval()
    return make_distiller(cfg, student, teacher, CIFAR100_TRAIN_SIZE, num_classes)


def measure(
    method: str,
    pair: str,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    amp: str = "",
    channels_last: bool = False,
    compiled: bool = False,
) -> dict:
    """Median step time, images per second and peak memory of ``method`` in this process; with
    ``compiled`` (SOLVER.COMPILE True) also the compilation time of its first step."""
    torch.manual_seed(0)
    distiller = build(method, pair)
    method_cfg = method_config(method, pair)
    size, num_classes = IMAGE_SIZE[method_cfg.DATASET.TYPE], NUM_CLASSES[method_cfg.DATASET.TYPE]
    batch = (torch.randn(batch_size, 3, size, size), torch.randint(0, num_classes, (batch_size,)), torch.arange(batch_size))
    batch = tuple(item.to(device) for item in batch)
    with tempfile.TemporaryDirectory() as log_prefix:  # the trainer's logs, unread
        # A small learning rate: the teacher's weights are random, and VID's loss on its features
        # overflows within a few steps at 0.05; the step's cost does not depend on it.
        cfg = load_cfg(None, ["LOG.PREFIX", log_prefix, "SOLVER.AMP", amp, "SOLVER.CHANNELS_LAST", channels_last,
                              "SOLVER.TRAINER", method_cfg.SOLVER.TRAINER, "SOLVER.COMPILE", compiled,
                              "SOLVER.LR", BENCHMARK_LR])
        trainer = Trainer("benchmark", distiller, [batch], [batch[:2]], cfg, device)
        trainer.tf_writer.close()
    trainer.model.train()  # a distiller keeps its teacher in eval mode
    memory = PeakMemory(device)
    memory.start()
    times = []
    for iteration in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        trainer.train_step(batch, epoch=1, iteration=iteration)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = memory.peak()
    step = statistics.median(times[warmup:])
    return {"method": method, "compiled": compiled, "step_ms": 1000 * step, "images_per_s": batch_size / step,
            "compile_s": times[0] - step if compiled else 0.0, "peak_mib": peak / 2**20, "peak_source": memory.source}


def run_in_fresh_process(method: str, args: argparse.Namespace, compiled: bool = False) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--pair", args.pair,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--amp", args.amp] + (["--channels-last"] if args.channels_last else [])
    command += ["--compile"] if compiled else []
    with tempfile.TemporaryDirectory() as cache:  # inductor's on-disk cache, empty: the first run's compile time
        env = {**os.environ, **GLIBC_ENV, **({"TORCHINDUCTOR_CACHE_DIR": cache} if compiled else {})}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark of {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_methods(args: argparse.Namespace) -> dict:
    """Every method of ``args.methods`` (scratch first), eagerly and, with ``args.compile``, right
    after compiled (a noisy machine drifts less between the two); ratios are taken within a mode."""
    methods = ["scratch"] + [m for m in args.methods if m != "scratch"]
    modes = (False, True) if args.compile else (False,)
    records = [{"compiled": compiled, **run_in_fresh_process(method, args, compiled)}
               for method in methods for compiled in modes]
    for mode in modes:
        results = [record for record in records if record["compiled"] == mode]
        scratch = results[0]
        cat_kd = next((result for result in results if result["method"] == "cat_kd"), None)
        for result in results:
            result["time_vs_scratch"] = result["step_ms"] / scratch["step_ms"]
            result["memory_vs_scratch"] = result["peak_mib"] / scratch["peak_mib"]
            if cat_kd is not None:  # LAKD's paper compares its memory with CAT-KD's
                result["memory_vs_cat_kd"] = result["peak_mib"] / cat_kd["peak_mib"]
    return {"pair": args.pair, "batch_size": args.batch_size, "device": args.device, "amp": args.amp,
            "channels_last": args.channels_last, "compile": args.compile, "results": records}


def print_methods(report: dict, steps: int) -> None:
    amp = f", AMP {report['amp']}" if report["amp"] else ""
    layout = ", channels_last" if report["channels_last"] else ""
    print(f"{report['pair']}, batch {report['batch_size']}, {report['device']}{amp}{layout}: median of {steps} "
          "steps, peak memory above the first step's start")
    width = 16 if report.get("compile") else 12  # room for " (c)", the compiled rows
    print(f"{'method':<{width}} {'step ms':>9} {'images/s':>9} {'peak MiB':>9} {'time/scratch':>13} "
          f"{'memory/scratch':>15} {'memory/cat_kd':>14}")
    for r in report["results"]:
        name = r["method"] + (" (c)" if r.get("compiled") else "")
        print(f"{name:<{width}} {r['step_ms']:9.1f} {r['images_per_s']:9.0f} {r['peak_mib']:9.1f} "
              f"{r['time_vs_scratch']:13.2f} {r['memory_vs_scratch']:15.2f} {_ratio(r.get('memory_vs_cat_kd')):>14}")
    if report.get("compile"):
        print_compiled(report["results"])


def print_compiled(results: list[dict]) -> None:
    """Eager against compiled, per method: the (c) rows above are the compiled ones."""
    compiled = {r["method"]: r for r in results if r["compiled"]}
    print(f"\n{'method':<12} {'eager ms':>9} {'compiled ms':>12} {'eager/compiled':>15} {'compile s':>10}")
    for r in results:
        if not r["compiled"]:
            c = compiled[r["method"]]
            print(f"{r['method']:<12} {r['step_ms']:9.1f} {c['step_ms']:12.1f} {r['step_ms'] / c['step_ms']:15.2f} "
                  f"{c['compile_s']:10.1f}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def pipeline_speed(pipeline: str, root: str, batch_size: int, num_workers: int, batches: int,
                   device: torch.device) -> float:
    """Images per second the training loader of ``pipeline`` delivers onto ``device``."""
    cfg = load_cfg(None, ["DATASET.ROOT", root, "DATASET.DOWNLOAD", False, "DATASET.PIPELINE", pipeline,
                          "SOLVER.BATCH_SIZE", batch_size, "DATASET.NUM_WORKERS", num_workers])
    train_loader = get_dataset(cfg, device)[0]
    getattr(train_loader, "set_epoch", lambda epoch: None)(1)
    loaded = iter(train_loader)
    next(loaded)  # starts the workers
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(batches), loaded):
        images += len(batch[0].to(device, non_blocking=True))
    synchronize(device)
    return images / (time.perf_counter() - start)


def compare_pipelines(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as temp:
        root = args.data_root
        if not os.path.isfile(os.path.join(root, "cifar-100-python", "train")):
            sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
            from fake_cifar import write_cifar  # the tests' writer of CIFAR files

            root = temp
            write_cifar(root, "cifar100", num_train=args.batch_size * (args.data_batches + 1), num_test=1)
        speeds = {pipeline: pipeline_speed(pipeline, root, args.batch_size, args.workers, args.data_batches, device)
                  for pipeline in PIPELINES}
    return {"batch_size": args.batch_size, "device": args.device, "num_workers": args.workers,
            "data": args.data_root if root == args.data_root else "random images",
            "images_per_s": speeds, "tensor_vs_torchvision": speeds["tensor"] / speeds["torchvision"]}


def print_pipelines(report: dict) -> None:
    print(f"CIFAR-100 training batches of {report['batch_size']} onto {report['device']} ({report['data']}; "
          f"torchvision with {report['num_workers']} workers)")
    for pipeline, speed in report["images_per_s"].items():
        print(f"{pipeline:<12} {speed:10.0f} images/s")
    print(f"tensor / torchvision: {report['tensor_vs_torchvision']:.1f}x")


def saved_per_module(pair: str, batch_size: int, device: torch.device) -> dict:
    """Bytes saved for backward by each local module of the pair's LAKD config and by the whole student."""
    cfg = load_cfg(os.path.join(REPO_ROOT, "configs", "cifar100", "lakd", f"{pair}.yaml"))
    torch.manual_seed(0)
    student = build_model(cfg.DISTILLER.STUDENT, "cifar100", 100, "DISTILLER.STUDENT").to(device).train()
    blocks = [block for _, block in find_blocks(student)]
    locations = list(cfg.LAKD.LOCATIONS)
    # Module k runs blocks starts[k] .. ends[k] (1-based): up to each cut, then to the last block
    # (with the head); the stem runs before block 1, in module 0.
    ends = locations[:-1] + [len(blocks)]
    starts = [1] + [end + 1 for end in ends[:-1]]
    current = [0]
    for module, (start, end) in enumerate(zip(starts, ends)):
        for block in blocks[start - 1:end]:
            block.register_forward_pre_hook(lambda *_, module=module: current.__setitem__(0, module))
    persistent = {tensor.data_ptr() for tensor in [*student.parameters(), *student.buffers()]}
    saved = [{} for _ in locations]  # per module: storage pointer -> bytes

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in persistent:
            saved[current[0]][storage.data_ptr()] = storage.nbytes()
        return tensor

    image = torch.randn(batch_size, 3, 32, 32, device=device)
    target = torch.randint(0, 100, (batch_size,), device=device)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        F.cross_entropy(student(image)[0], target)
    whole = sum({pointer: size for module in saved for pointer, size in module.items()}.values())
    modules = [{"blocks": [start, end], "saved_mib": sum(sizes.values()) / 2**20,
                "share": sum(sizes.values()) / whole}
               for start, end, sizes in zip(starts, ends, saved)]
    return {"pair": pair, "student": cfg.DISTILLER.STUDENT, "locations": locations, "batch_size": batch_size,
            "modules": modules, "whole_mib": whole / 2**20, "floor": max(m["share"] for m in modules)}


def print_saved(report: dict) -> None:
    print(f"{report['student']} ({report['pair']}) at LAKD.LOCATIONS {report['locations']}, batch "
          f"{report['batch_size']}: bytes saved for backward in one training forward")
    print(f"{'module':<8} {'blocks':>8} {'saved MiB':>10} {'share':>6}")
    for k, module in enumerate(report["modules"], start=1):
        blocks = "{}-{}".format(*module["blocks"])
        print(f"{k:<8} {blocks:>8} {module['saved_mib']:10.1f} {module['share']:6.2f}")
    print(f"{'whole':<8} {'':>8} {report['whole_mib']:10.1f} {1:6.2f}")
    print(f"floor of LAKD eager's peak memory / from-scratch: {report['floor']:.2f} (the largest module's share)")


def run_cuda_tests() -> list[dict]:
    """Outcome of each test of tests/test_cuda.py, run by pytest in a subprocess."""
    with tempfile.TemporaryDirectory() as temp:
        junit = os.path.join(temp, "cuda.xml")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                   os.path.join(REPO_ROOT, "tests", "test_cuda.py")]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        if not os.path.isfile(junit):
            raise RuntimeError(f"pytest did not run tests/test_cuda.py:\n{(result.stdout + result.stderr)[-3000:]}")
        return junit_outcomes(ElementTree.parse(junit).getroot())


def junit_outcomes(junit: ElementTree.Element) -> list[dict]:
    """``[{"test", "outcome", "message"}]`` of a pytest JUnit XML report."""
    outcomes = []
    for case in junit.iter("testcase"):
        problem = next((case.find(tag) for tag in ("failure", "error", "skipped") if case.find(tag) is not None), None)
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(getattr(problem, "tag", ""), "passed")
        message = "" if problem is None else problem.get("message", "").split("\n")[0][:100]
        outcomes.append({"test": case.get("name"), "outcome": outcome, "message": message})
    return outcomes


def cuda_report(args: argparse.Namespace) -> dict:
    """tests/test_cuda.py's outcomes and every method measured on CUDA."""
    args.device, args.methods = "cuda", list(METHODS)
    return {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
            "tests": run_cuda_tests(), "benchmark": compare_methods(args)}


def print_cuda_report(report: dict, steps: int) -> None:
    benchmark = report["benchmark"]
    print(f"CUDA check on {report['gpus']} x {report['device']}: tests/test_cuda.py, then {benchmark['pair']} at batch "
          f"{benchmark['batch_size']} (median of {steps} steps; peak: torch.cuda.max_memory_allocated)")
    rows = [(f"test {t['test']}", t["outcome"] + (f": {t['message']}" if t["message"] else "")) for t in report["tests"]]
    rows += [(f"benchmark {r['method']}", f"{r['step_ms']:.1f} ms/step, peak {r['peak_mib']:.1f} MiB, "
              f"{r['memory_vs_scratch']:.2f}x scratch, {_ratio(r.get('memory_vs_cat_kd'))}x cat_kd memory, "
              f"{r['time_vs_scratch']:.2f}x scratch time") for r in benchmark["results"]]
    width = max(len(check) for check, _ in rows)
    print(f"{'check':<{width}}  result")
    for check, result in rows:
        print(f"{check:<{width}}  {result}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("training-step cost of distillation methods; data pipeline speed")
    parser.add_argument("--pair", default="res56_res20", help="a pair of configs/cifar100/<method>/")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, help="default: 128 for methods, 64 with --data")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="", choices=["", "bf16", "fp16"], help="SOLVER.AMP")
    parser.add_argument("--channels-last", action="store_true", help="SOLVER.CHANNELS_LAST")
    parser.add_argument("--compile", action="store_true", help="each method also with SOLVER.COMPILE True")
    parser.add_argument("--data", action="store_true", help="compare the CIFAR data pipelines instead")
    parser.add_argument("--saved", action="store_true", help="bytes saved for backward per LAKD local module")
    parser.add_argument("--data-root", default="./data", help="--data: DATASET.ROOT holding CIFAR-100")
    parser.add_argument("--data-batches", type=int, default=150, help="--data: timed batches per pipeline")
    parser.add_argument("--workers", type=int, default=2, help="--data: DATASET.NUM_WORKERS of torchvision")
    parser.add_argument("--cuda-report", action="store_true",
                        help="the GPU check: tests/test_cuda.py and every method on CUDA, as one table")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (64 if args.data else 128)
    if args.worker:
        result = measure(args.worker, args.pair, args.batch_size, args.steps, args.warmup, torch.device(args.device),
                         args.amp, args.channels_last, args.compile)
        print(json.dumps(result))
        return 0
    if args.cuda_report:
        if not torch.cuda.is_available():
            print("benchmark.py --cuda-report needs a CUDA GPU, and torch.cuda.is_available() is False on this "
                  "machine: run it where a GPU is visible", file=sys.stderr)
            return 2
        report = cuda_report(args)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_cuda_report(report, args.steps)
        return int(any(t["outcome"] in ("failed", "error") for t in report["tests"]))
    if args.saved:
        report = saved_per_module(args.pair, args.batch_size, torch.device(args.device))
    else:
        report = compare_pipelines(args) if args.data else compare_methods(args)
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.saved:
        print_saved(report)
    elif args.data:
        print_pipelines(report)
    else:
        print_methods(report, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
