"""The figures of ``tools/compare.py`` and ``tools/analyze.py``. Sizes are fixed per panel (inches,
drawn at ``plotting.DPI``) so that a figure's pixel size follows from what it shows."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .events import Curve
from .plotting import pyplot
from .runs import Run

CURVE_PANEL = (4.0, 3.0)  # one student's accuracy curves, or one logged loss
CKA_PANEL = (3.6, 3.2)  # one run's teacher x student CKA matrix
MAP_CELL = 1.5  # one image or map of the maps grid
EK_FIGURE = (7.0, 3.5)
CMI_FIGURE = (7.0, 3.5)
_MAX_COLUMNS = 4


def _panel_grid(count: int, panel: tuple[float, float]):
    """A figure of ``count`` panels in rows of at most ``_MAX_COLUMNS``; returns it and the used axes."""
    columns = min(_MAX_COLUMNS, count)
    rows = -(-count // columns)
    figure, axes = pyplot().subplots(
        rows, columns, figsize=(panel[0] * columns, panel[1] * rows), squeeze=False, layout="constrained"
    )
    flat = list(axes.flat)
    for unused in flat[count:]:
        unused.set_visible(False)
    return figure, flat[:count]


def plot_accuracy_curves(runs: Sequence[Run]):
    """Test top-1 against epoch, one panel per dataset and student (the from-scratch run beside the
    distilled ones), one line per run."""
    panels: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        panels.setdefault((run.dataset, run.student), []).append(run)
    figure, axes = _panel_grid(len(panels), CURVE_PANEL)
    for ax, ((dataset, student), members) in zip(axes, sorted(panels.items())):
        for run in members:
            epochs, accuracies = zip(*run.accuracies)
            ax.plot(epochs, accuracies, label=f"{run.method} ({run.label})", linewidth=1)
        ax.set_title(f"{dataset}: student {student}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return figure


def plot_cka(panels: Sequence[Mapping]):
    """One heat map per run: ``matrix[i][j]`` = CKA of teacher stage i and student stage j."""
    figure, axes = _panel_grid(len(panels), CKA_PANEL)
    for ax, panel in zip(axes, panels):
        matrix = panel["cka"]
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 else "white")
        ax.set_xticks(range(len(matrix[0])), [f"f{j}" for j in range(len(matrix[0]))], fontsize=7)
        ax.set_yticks(range(len(matrix)), [f"f{i}" for i in range(len(matrix))], fontsize=7)
        ax.set_xlabel(f"student {panel['student']}", fontsize=8)
        ax.set_ylabel(f"teacher {panel['teacher']}", fontsize=8)
        ax.set_title(panel["title"], fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.8, label="linear CKA")
    return figure


def _displayable(image: torch.Tensor) -> torch.Tensor:
    """A normalised (3, H, W) input as an (H, W, 3) picture in [0, 1] (min-max over the image)."""
    image = image.float()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    return image.permute(1, 2, 0)


def _overlay(small_map: torch.Tensor, size: tuple[int, int], value_range: Sequence[float] = ()) -> torch.Tensor:
    """A map upsampled to the image ``size`` (bilinear) and scaled to [0, 1]: from ``value_range``
    (low, high) when given (masks keep their absolute level), else min-max."""
    large = F.interpolate(small_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    low, high = value_range or (large.min(), large.max())
    return ((large - low) / max(float(high - low), 1e-12)).clamp(0, 1)


def plot_maps(images: torch.Tensor, row_titles: Sequence[str], columns: Sequence[tuple]):
    """A grid: one row per image, the input first, then one column per ``(title, maps (N, h, w))``
    or ``(title, maps, (low, high))``, each map upsampled, scaled (min-max, or from low..high) and
    laid over the image."""
    plt = pyplot()
    rows, cols = len(images), 1 + len(columns)
    figure, axes = plt.subplots(rows, cols, figsize=(MAP_CELL * cols, MAP_CELL * rows), squeeze=False,
                                layout="constrained")
    size = tuple(images.shape[-2:])
    for r in range(rows):
        picture = _displayable(images[r])
        axes[r][0].imshow(picture)
        axes[r][0].set_ylabel(row_titles[r], fontsize=6)
        for c, (_, maps, *value_range) in enumerate(columns, start=1):
            axes[r][c].imshow(picture)
            axes[r][c].imshow(_overlay(maps[r], size, *value_range), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for c, title in enumerate(["input", *(column[0] for column in columns)]):
        axes[0][c].set_title(title, fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return figure


def plot_loss_curves(curves: Mapping[str, Mapping[str, Curve]], tags: Sequence[str]):
    """One panel per logged tag, one line per run (``curves[run][tag]``)."""
    figure, axes = _panel_grid(len(tags), CURVE_PANEL)
    for ax, tag in zip(axes, tags):
        for run, run_curves in curves.items():
            if tag in run_curves:
                steps, values = zip(*run_curves[tag])
                ax.plot(steps, values, label=run, linewidth=1)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("epoch" if not tag.startswith("iter/") else "iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return figure


def plot_ek(labels: Sequence[str], stats: Sequence[Mapping]):
    """Bars per run: EK and agreement with the teacher (left), student and teacher top-1 (right)."""
    figure, (left, right) = pyplot().subplots(1, 2, figsize=EK_FIGURE, layout="constrained")
    positions = range(len(labels))
    width = 0.4
    for ax, (first, second), title in (
        (left, ("ek", "agreement"), "vs teacher (%)"),
        (right, ("student_top1", "teacher_top1"), "top-1 (%)"),
    ):
        for offset, key in ((-width / 2, first), (width / 2, second)):
            values = [entry[key] for entry in stats]
            bars = ax.bar([p + offset for p in positions], values, width, label=key)
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set_xticks(list(positions), labels, rotation=20, ha="right", fontsize=6)
        ax.set_ylim(0, 118)  # room for the legend above the bars
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, loc="upper center", ncol=2)
    return figure


def plot_cmi(labels: Sequence[str], stats: Sequence[Mapping]):
    """Bars per model: CMI (left) and top-1 (right) on the measured images."""
    figure, axes = pyplot().subplots(1, 2, figsize=CMI_FIGURE, layout="constrained")
    positions = list(range(len(labels)))
    labels = [label if len(label) <= 32 else label[:31] + "…" for label in labels]  # folder names can be long
    for ax, key, title, fmt in ((axes[0], "cmi", "CMI (nats)", "%.4f"), (axes[1], "top1", "top-1 (%)", "%.1f")):
        bars = ax.bar(positions, [entry[key] for entry in stats], 0.6)
        ax.bar_label(bars, fmt=fmt, fontsize=6)
        ax.set_xticks(positions, labels, rotation=20, ha="right", fontsize=6)
        ax.set_title(title, fontsize=9)
    return figure
