"""Look inside trained runs: ``python tools/analyze.py {cka,maps,curves,ek,cmi} RUN_DIR... [options]``.

Each sub-command writes a PNG (``--out``, default ``analysis/<command>.png``) and its numbers as JSON
beside it (same name, ``.json``). Needs matplotlib: ``pip install -e ".[viz]"``.

  cka     linear CKA between every teacher stage output and every student stage output, one heat
          map per run, on ``--num-images`` validation images
  maps    for a few validation images: the input, then the teacher's and each run's spatial
          activation map and class activation map of the true class; for methods with masks
          (ACAM-KD) also the run's spatial masks of its last distilled stage (all stages in the JSON)
  curves  logged training curves (default: the per-epoch average of each loss term, e.g. LAKD's
          per-location losses L_k, CE and CAT) from the runs' tensorboard events
  ek      Extracurricular Knowledge and agreement of each run's student with its teacher on the
          validation set
  cmi     conditional mutual information I(X; Y_hat | Y) and top-1 of each run's student (or of the
          checkpoint file ``--ckpt FILE --cfg CFG``, e.g. a teacher before MCMI fine-tuning), by
          default on the training set with its augmentation, in eval mode (as MCMI's authors
          measure it); ``--split test`` for the validation set

Runs are read with their saved config (``config.yaml`` in the run folder, else ``--cfg``); the
runs of one call must share teacher and dataset. ``--opts KEY VALUE ...`` overrides config keys
(e.g. ``DATASET.ROOT``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch
from yacs.config import CfgNode

from mdistiller_lakd.analysis.cka import cka_matrix
from mdistiller_lakd.analysis.ek import agreement_stats
from mdistiller_lakd.analysis.events import read_scalars
from mdistiller_lakd.analysis.features import head_maps, stage_grams
from mdistiller_lakd.analysis.figures import plot_cka, plot_cmi, plot_ek, plot_loss_curves, plot_maps
from mdistiller_lakd.analysis.loading import (
    LoadedRun, evenly_spaced, load_masking_distiller, load_runs, load_student, run_config, subset_loader,
)
from mdistiller_lakd.analysis.plotting import MissingExtraError, pyplot, save_figure, save_json
from mdistiller_lakd.analysis.runs import canonical_method
from mdistiller_lakd.dataset import get_dataset
from mdistiller_lakd.engine.cfg import ConfigError, load_cfg
from mdistiller_lakd.engine.checkpoint import CheckpointError
from mdistiller_lakd.engine.utils import validate

DEFAULT_CURVE_TAGS = r"^train_losses/"  # the trainer's per-epoch average of each loss term


def teacher_label(runs: list[LoadedRun]) -> str:
    teacher, checkpoint = runs[0].teacher_source
    return f"{teacher} ({checkpoint or 'released checkpoint'})"


def _cka(args, device: torch.device):
    runs, teacher, val_loader = load_runs(args.run_dirs, args.cfg, args.opts, args.ckpt, device)
    indices = evenly_spaced(len(val_loader.dataset), args.num_images)
    images = subset_loader(val_loader, indices)
    teacher_grams, teacher_shapes = stage_grams(teacher, images, device)
    panels = []
    for run in runs:
        student_grams, student_shapes = stage_grams(run.student, images, device)
        panels.append({
            "run": run.path, "title": run.label, "checkpoint": run.checkpoint,
            "teacher": run.cfg.DISTILLER.TEACHER, "student": run.cfg.DISTILLER.STUDENT,
            "teacher_shapes": teacher_shapes, "student_shapes": student_shapes,
            "cka": cka_matrix(teacher_grams, student_grams),
        })
    return {"images": len(indices), "image_indices": indices, "runs": panels}, plot_cka(panels)


def _maps(args, device: torch.device):
    runs, teacher, val_loader = load_runs(args.run_dirs, args.cfg, args.opts, args.ckpt, device)
    indices = args.images if args.images else evenly_spaced(len(val_loader.dataset), args.num_images)
    image, target = next(iter(subset_loader(val_loader, indices, batch_size=len(indices))))
    image = image.float().to(device)
    names = [canonical_method(run.cfg.DISTILLER.TYPE) for run in runs]
    names = [f"{name} #{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]
    models = [("teacher", teacher_label(runs), teacher, None)]
    models += [(name, run.path, run.student, run) for name, run in zip(names, runs)]
    entries, columns = [], []
    for name, source, model, run in models:
        maps = head_maps(model, image, target)
        entries.append({"model": name, "source": source, "prediction": maps["prediction"].tolist(),
                        "activation": maps["activation"].tolist(), "class_map": maps["class_map"].tolist()})
        columns += [(f"{name} map", maps["activation"]), (f"{name} CAM", maps["class_map"])]
        distiller = load_masking_distiller(run, teacher, device) if run is not None else None
        if distiller is not None:  # e.g. ACAM-KD: its spatial masks, on their absolute 0..1 scale
            spatial = [stage["spatial"].float().cpu() for stage in distiller.masks(image)]
            entries[-1]["spatial_masks"] = [masks.tolist() for masks in spatial]  # per stage (N, M, h, w)
            columns += [(f"{name} mask {m + 1}", spatial[-1][:, m], (0.0, 1.0)) for m in range(spatial[-1].shape[1])]
    row_titles = [f"#{index} class {label}" for index, label in zip(indices, target.tolist())]
    data = {"image_indices": list(indices), "labels": target.tolist(), "models": entries}
    return data, plot_maps(image.cpu(), row_titles, columns)


def _curves(args, device: torch.device):
    pattern = re.compile(args.tags)
    curves = {run_dir: read_scalars(run_dir) for run_dir in args.run_dirs}
    tags = sorted({tag for run_curves in curves.values() for tag in run_curves if pattern.search(tag)})
    if not tags:
        available = sorted({tag for run_curves in curves.values() for tag in run_curves})
        raise ValueError(f"--tags {args.tags!r} matches no logged scalar; the runs log: {', '.join(available) or 'none'}")
    selected = {
        run_dir: {tag: run_curves[tag] for tag in tags if tag in run_curves} for run_dir, run_curves in curves.items()
    }
    labels = {run_dir: os.path.basename(os.path.normpath(run_dir)) for run_dir in args.run_dirs}
    figure = plot_loss_curves({labels[run_dir]: run_curves for run_dir, run_curves in selected.items()}, tags)
    return {"tags": tags, "runs": selected}, figure


def _ek(args, device: torch.device):
    runs, teacher, val_loader = load_runs(args.run_dirs, args.cfg, args.opts, args.ckpt, device)
    if args.num_images:
        val_loader = subset_loader(val_loader, evenly_spaced(len(val_loader.dataset), args.num_images))
    teacher_result = validate(val_loader, lambda image: teacher(image)[0], device, desc="teacher ")
    entries = []
    for run in runs:
        result = validate(val_loader, lambda image: run.student(image)[0], device, desc=f"{run.label} ")
        entries.append({"run": run.path, "label": run.label,
                        **agreement_stats(result.predictions, teacher_result.predictions, result.targets)})
    data = {"teacher": teacher_label(runs), "runs": entries}
    return data, plot_ek([entry["label"] for entry in entries], entries)


class ImagesAndTargets:
    """A loader's batches cut to (image, target): training batches carry indices too."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (batch[:2] for batch in self.loader)


def _cmi_models(args) -> list[tuple[str, CfgNode, str]]:
    """(label, config, checkpoint path) of each model to measure."""
    if args.run_dirs:
        return [(run_dir, run_config(run_dir, args.cfg, args.opts), os.path.join(run_dir, args.ckpt))
                for run_dir in args.run_dirs]
    if args.cfg is None or not os.path.isfile(args.ckpt):
        raise FileNotFoundError(
            f"cmi: give RUN_DIRs, or a checkpoint file and the config of its dataset and architecture "
            f"(DISTILLER.STUDENT): --ckpt FILE --cfg CFG (--ckpt is {args.ckpt!r})"
        )
    return [(args.ckpt, load_cfg(args.cfg, [*args.opts, "DATASET.PIPELINE", "torchvision"]), args.ckpt)]


def _cmi(args, device: torch.device):
    entries = []
    for label, cfg, path in _cmi_models(args):
        train_loader, val_loader, _, num_classes = get_dataset(cfg)
        loader = train_loader if args.split == "train" else val_loader
        if args.num_images:
            loader = subset_loader(loader, evenly_spaced(len(loader.dataset), args.num_images))
        student = load_student(os.path.dirname(path), cfg, os.path.basename(path), num_classes).to(device)
        torch.manual_seed(0)  # the same crops, flips and order for every model: comparable numbers
        result = validate(ImagesAndTargets(loader), lambda image: student(image)[0], device, desc="cmi ")
        entries.append({"model": label, "checkpoint": path, "split": args.split, "images": len(result.targets),
                        "cmi": result.cmi, "top1": result.top1})
        print(f"{label}: CMI {result.cmi:.4f}, top-1 {result.top1:.2f}% on {len(result.targets)} {args.split} images")
    return {"models": entries}, plot_cmi([os.path.basename(os.path.normpath(e["model"])) for e in entries], entries)


COMMANDS = {"cka": _cka, "maps": _maps, "curves": _curves, "ek": _ek, "cmi": _cmi}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, description in (
        ("cka", "linear CKA, teacher stages x student stages"),
        ("maps", "spatial and class activation maps of a few validation images"),
        ("curves", "training curves from the tensorboard events"),
        ("ek", "Extracurricular Knowledge and agreement with the teacher"),
        ("cmi", "conditional mutual information and top-1 of each student, or of --ckpt FILE --cfg CFG"),
    ):
        sub = commands.add_parser(name, help=description, description=description)
        sub.add_argument("run_dirs", nargs="*" if name == "cmi" else "+", metavar="RUN_DIR")
        sub.add_argument("--out", default=os.path.join("analysis", f"{name}.png"),
                         help="the PNG to write; the JSON goes beside it (default: %(default)s)")
        if name == "curves":
            sub.add_argument("--tags", default=DEFAULT_CURVE_TAGS,
                             help="regular expression selecting the scalars to draw (default: %(default)s)")
            continue
        sub.add_argument("--cfg", help="config of runs whose folder holds no config.yaml")
        sub.add_argument("--ckpt", default="student_best", help="student checkpoint in the run folder (default: "
                         "%(default)s)" + ("; without RUN_DIR, a checkpoint file" if name == "cmi" else ""))
        sub.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="config overrides for every run")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        default_images = {"cka": 1000, "maps": 4, "ek": 0, "cmi": 0}[name]
        sub.add_argument("--num-images", type=int, default=default_images,
                         help="validation images used, evenly spaced over the set (0: all; default: %(default)s)")
        if name == "cmi":
            sub.add_argument("--split", choices=("train", "test"), default="train",
                             help="training images (with their augmentation) or validation images (default: %(default)s)")
        if name == "maps":
            sub.add_argument("--images", type=int, nargs="+", help="validation image indices (instead of --num-images)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        pyplot()
    except MissingExtraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = torch.device(getattr(args, "device", "cpu"))
    try:
        data, figure = COMMANDS[args.command](args, device)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, IndexError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    json_path = os.path.splitext(args.out)[0] + ".json"
    save_figure(figure, args.out)
    save_json(data, json_path)
    print(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
