"""Export a trained student for deployment, NDAM inside, checked equal to it before it is written:
``python tools/export.py -c RUN_DIR/student_best [-m MODEL] [-d DATASET] --format {pt2,torchscript,onnx} -o OUT``.

The student is loaded as tools/eval.py loads it (LAKD's NDAM re-attached from the checkpoint) and
its logits function exported with a dynamic batch dimension. The export is read back with its own
runtime and compared with the student on random images and, when the dataset is under ``--root``,
on validation images; it is written (atomically) only when no logit differs by more than
``--atol``. Exit status: 0 written, 1 refused (the export differs), 2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

import torch

from mdistiller_lakd.analysis.loading import evenly_spaced, subset_loader
from mdistiller_lakd.dataset import DatasetNotFoundError, get_dataset
from mdistiller_lakd.engine.build import load_trained_model
from mdistiller_lakd.engine.cfg import ConfigError, load_cfg
from mdistiller_lakd.engine.checkpoint import CheckpointError, atomic_write, load_checkpoint
from mdistiller_lakd.engine.utils import log_msg
from mdistiller_lakd.export import (
    EXPORT_BATCH, FORMATS, IMAGE_SIZE, NUM_CLASSES, ExporterMissingError, StudentLogits, check_student_checkpoint,
    compare, example_images,
)

RANDOM_CHECK_BATCH = 8  # not EXPORT_BATCH: the check also shows that the batch dimension is dynamic


def named_in_checkpoint(option: str, what: str, given: str | None, saved: str | None, path: str) -> str:
    """The architecture or dataset: the one given on the command line or the one the checkpoint names."""
    if given and saved and given != saved:
        raise CheckpointError(f"{option} {given}: {path} holds a student of {what} '{saved}'")
    if not (given or saved):
        raise CheckpointError(f"{option}: {path} does not name its {what}; give it with {option}")
    return given or saved


def validation_images(dataset: str, root: str, batch_size: int, num_images: int) -> Iterator[torch.Tensor] | None:
    """``num_images`` validation images spread over the set, in batches; None when the dataset is
    not under ``root`` (the check then runs on random images only)."""
    cfg = load_cfg(None, ["DATASET.TYPE", dataset, "DATASET.ROOT", root, "DATASET.DOWNLOAD", False,
                          "DATASET.TEST.BATCH_SIZE", batch_size, "DATASET.NUM_WORKERS", 0])
    try:
        _, val_loader, _, _ = get_dataset(cfg)
    except DatasetNotFoundError:
        return None
    indices = evenly_spaced(len(val_loader.dataset), num_images)
    return (image for image, _ in subset_loader(val_loader, indices))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("export a trained student (NDAM inside) for deployment")
    parser.add_argument("-c", "--ckpt", type=str, required=True, help="student checkpoint, e.g. RUN_DIR/student_best")
    parser.add_argument("-m", "--model", type=str, default=None, help="architecture (default: the checkpoint's)")
    parser.add_argument("-d", "--dataset", type=str, default=None, choices=sorted(IMAGE_SIZE),
                        help="dataset it was trained on (default: the checkpoint's)")
    parser.add_argument("--format", type=str, required=True, choices=sorted(FORMATS))
    parser.add_argument("-o", "--out", type=str, required=True, help="file to write")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference accepted (fp32)")
    parser.add_argument("--root", type=str, default="./data", help="DATASET.ROOT, for the check on validation images")
    parser.add_argument("--num-images", type=int, default=256, help="validation images checked (0: all)")
    parser.add_argument("-bs", "--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    export_format = FORMATS[args.format]

    try:
        checkpoint = load_checkpoint(args.ckpt)
        check_student_checkpoint(checkpoint, args.ckpt)
        arch = named_in_checkpoint("-m", "architecture", args.model, checkpoint.get("arch"), args.ckpt)
        dataset = named_in_checkpoint("-d", "dataset", args.dataset, checkpoint.get("dataset"), args.ckpt)
        student = StudentLogits(load_trained_model(args.ckpt, arch, dataset, NUM_CLASSES[dataset], "-m")).eval()
        exported = export_format.export(student, example_images(dataset, EXPORT_BATCH))
        run_export = export_format.load(exported)
    except (ConfigError, CheckpointError, FileNotFoundError, ExporterMissingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if run_export is None:
        print(log_msg("onnxruntime is not installed: the export is NOT verified against the student "
                      '(pip install -e ".[onnx]" to verify it)', "INFO"))
    else:
        checks = [("random images", [example_images(dataset, RANDOM_CHECK_BATCH, seed=1)])]
        val_images = validation_images(dataset, args.root, args.batch_size, args.num_images)
        if val_images is None:
            print(log_msg(f"no {dataset} under --root {args.root}: checked on random images only", "INFO"))
        else:
            checks.append(("validation images", val_images))
        for source, batches in checks:
            agreement = compare(student, run_export, batches)
            print(log_msg(f"{agreement.images} {source}: "
                          f"largest logit difference {agreement.max_difference:.3g}, "
                          f"top-1 agreement {agreement.top1_agreement:.2f}%", "EVAL"))
            if not agreement.max_difference <= args.atol:  # NaN fails too
                print(f"error: the {args.format} export differs from the student by {agreement.max_difference:.3g} "
                      f"on {source} (more than --atol {args.atol:g}); {args.out} not written", file=sys.stderr)
                return 1

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, lambda f: f.write(exported))
    print(log_msg(f"wrote {args.out} ({arch} on {dataset}, {args.format}); load it without this package: "
                  + export_format.how_to_load.replace("OUT", repr(args.out)), "INFO"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
