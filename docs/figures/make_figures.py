"""Re-make the example pictures of docs/analysis.md ("Example figures"), on the CPU, with no
download: ``python docs/figures/make_figures.py [WORK_DIR]`` (about an hour on two cores).

Data: "shapes-10", synthetic 32x32 pictures in the CIFAR-10 file layout (5,000 train / 1,000 test):
one of five shapes (square, disc, triangle, cross, ring) in a warm or a cool colour (10 classes),
of random size and position, over a noisy colour gradient. Models: a resnet20 teacher trained from
scratch, then resnet8 students (from scratch, KD, FitNet, CAT-KD, LAKD, LAKD without detachment),
10 epochs each.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIGURES = os.path.join(REPO, "docs", "figures")
SHAPES = ("square", "disc", "triangle", "cross", "ring")
WARM, COOL = ((230, 60, 40), (240, 200, 30)), ((40, 90, 230), (40, 190, 120))
STUDENT_METHODS = ("NONE", "KD", "FITNET", "CAT_KD", "LAKD")
RECIPE = """DATASET:
  TYPE: cifar10
  ROOT: {root}
  NUM_WORKERS: 0
SOLVER:
  EPOCHS: 10
  LR: 0.05
  LR_DECAY_STAGES: [6, 8]
  WEIGHT_DECAY: 0.0005
LOG:
  PREFIX: {prefix}
  TENSORBOARD_FREQ: 20
EXPERIMENT:
  PROJECT: shapes10
  TAG: "{tag}"
DISTILLER:
  TYPE: {method}
  TEACHER: resnet20
  STUDENT: {student}
  TEACHER_CKPT: "{teacher_ckpt}"
"""
# Per method: CAT-KD and LAKD as this project's CIFAR configs set them (CAT weight 0.7, maps not
# normalised); LAKD cut at every block of resnet8 (one block per stage: 1, n+1, 3n = 1, 2, 3).
METHOD_KEYS = {
    "CAT_KD": "CAT_KD:\n  IF_NORMALIZE: False\n  LOSS:\n    CAT_loss_weight: 0.7\n",
    "LAKD": "LAKD:\n  LOCATIONS: [1, 2, 3]\n",
}


def shape_mask(kind: str, size: int) -> np.ndarray:
    y, x = np.mgrid[:size, :size] / (size - 1) * 2 - 1  # [-1, 1] square
    radius = np.hypot(x, y)
    masks = {
        "square": (abs(x) < 0.8) & (abs(y) < 0.8),
        "disc": radius < 0.9,
        "triangle": (y > -0.8) & (y < 1.6 * (1 - abs(x)) - 0.8),
        "cross": (abs(x) < 0.3) | (abs(y) < 0.3),
        "ring": (radius < 0.95) & (radius > 0.55),
    }
    return masks[kind]


def picture(label: int, rng: np.random.Generator) -> np.ndarray:
    """One (3, 32, 32) uint8 picture of class ``label``: shape label % 5, colour group label // 5."""
    gradient = np.linspace(0, 1, 32)[None, :, None] * rng.uniform(-60, 60, 3) + rng.uniform(70, 150, 3)
    image = gradient + rng.normal(0, 40, (32, 32, 3))
    size = int(rng.integers(7, 15))
    top, left = rng.integers(0, 33 - size, 2)
    colour = np.array((WARM if label // 5 == 0 else COOL)[rng.integers(2)]) + rng.normal(0, 30, 3)
    mask = shape_mask(SHAPES[label % 5], size)
    image[top:top + size, left:left + size][mask] = colour
    return np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def write_shapes(root: str, num_train: int = 5000, num_test: int = 1000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def dump(name: str, count: int) -> None:
        labels = [int(label) for label in rng.integers(0, 10, count)]
        data = np.stack([picture(label, rng).reshape(-1) for label in labels])
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)

    for i in range(1, 6):
        dump(f"data_batch_{i}", num_train // 5)
    dump("test_batch", num_test)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        names = [f"{colour} {shape}" for colour in ("warm", "cool") for shape in SHAPES]
        pickle.dump({b"label_names": [name.encode() for name in names]}, f, protocol=2)


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    # One thread: on a shared two-core machine more threads only contend.
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finished(run_dir: str) -> bool:
    """The run wrote its closing best_acc line."""
    worklog = os.path.join(run_dir, "worklog.txt")
    if not os.path.exists(worklog):
        return False
    with open(worklog) as f:
        return "best_acc" in f.read()


def train(work: str, method: str, student: str, teacher_ckpt: str = "", variant: str = "", keys: str = "") -> str:
    """Train one run (skipped when done); returns its folder. ``variant`` goes into the folder name,
    ``keys`` (YAML) into the config."""
    tag = f"{method.lower() if method != 'NONE' else 'vanilla'}{variant},{'resnet20,' if method != 'NONE' else ''}{student}"
    config = os.path.join(work, tag.replace(",", "_") + ".yaml")
    with open(config, "w") as f:
        f.write(RECIPE.format(root=os.path.join(work, "data"), prefix=os.path.join(work, "output"), tag=tag,
                              method=method, student=student, teacher_ckpt=teacher_ckpt)
                + (keys or METHOD_KEYS.get(method, "")))
    run_dir = os.path.join(work, "output", "shapes10", tag)
    if not finished(run_dir):
        run("tools/train.py", "--cfg", config)
    return run_dir


def main(work: str) -> None:
    if not os.path.exists(os.path.join(work, "data")):
        write_shapes(os.path.join(work, "data"))
    teacher = train(work, "NONE", "resnet20")
    teacher_ckpt = os.path.join(teacher, "student_best")
    students = {method: train(work, method, "resnet8", teacher_ckpt) for method in STUDENT_METHODS}
    # The paper's Figure 5 contrast: the same LAKD without the gradient detachment between modules.
    no_detach = train(work, "LAKD", "resnet8", teacher_ckpt, "-nodetach", METHOD_KEYS["LAKD"] + "  DETACH: False\n")
    pictures = os.path.join(work, "pictures")  # PNGs and their JSON; the PNGs are copied to docs/figures
    out = lambda name: os.path.join(pictures, name)  # noqa: E731
    run("tools/compare.py", *students.values(), no_detach, "--plot", out("compare_curves.png"))
    distilled = [students[m] for m in ("KD", "FITNET", "CAT_KD", "LAKD")]
    run("tools/analyze.py", "cka", *distilled, "--num-images", "500", "--out", out("cka.png"))
    run("tools/analyze.py", "maps", students["CAT_KD"], students["LAKD"], "--num-images", "4", "--out", out("maps.png"))
    run("tools/analyze.py", "curves", students["LAKD"], no_detach, "--out", out("curves.png"))
    run("tools/analyze.py", "ek", *distilled, "--out", out("ek.png"))
    for name in sorted(os.listdir(pictures)):
        if name.endswith(".png"):
            shutil.copy(os.path.join(pictures, name), FIGURES)

if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "shapes_work"))
