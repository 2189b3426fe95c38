"""Evaluate a saved model on the validation set:
``python tools/eval.py -m resnet20 -c output/.../student_best [-d cifar100] [--root ./data] [-bs 64] [--no-ndam]``.

``-c pretrain`` (the default) reads upstream's released teacher of that model (CIFAR-100, or
Tiny-ImageNet's ResNet18 at upstream's location) or the pretrained ImageNet weights.
"""
from __future__ import annotations

import argparse
import sys

import torch

from mdistiller_lakd.dataset import get_dataset
from mdistiller_lakd.engine.build import build_model, load_trained_model
from mdistiller_lakd.engine.cfg import ConfigError, load_cfg
from mdistiller_lakd.engine.checkpoint import CheckpointError
from mdistiller_lakd.engine.utils import log_msg, validate
from mdistiller_lakd.models import zoo_of


def load_model(name: str, ckpt: str, dataset: str, num_classes: int, with_ndam: bool = True) -> torch.nn.Module:
    """Model ``name`` with the weights of ``ckpt``, LAKD's NDAM re-attached when the checkpoint has
    it (and ``with_ndam``)."""
    if dataset == "imagenet" and ckpt == "pretrain":
        return build_model(name, dataset, num_classes, "--model", pretrained=True)
    path = zoo_of(dataset)[name][1] if ckpt == "pretrain" else ckpt
    if path is None:
        raise FileNotFoundError(f"--ckpt: upstream releases no checkpoint for '{name}'; give the file with -c")
    return load_trained_model(path, name, dataset, num_classes, "--model", with_ndam)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("evaluate a model on the validation set")
    parser.add_argument("-m", "--model", type=str, required=True, help="architecture, e.g. resnet20")
    parser.add_argument("-c", "--ckpt", type=str, default="pretrain", help="checkpoint file (ours or upstream's)")
    parser.add_argument("-d", "--dataset", type=str, default="cifar100", choices=["cifar100", "cifar10", "tiny_imagenet", "imagenet"])
    parser.add_argument("--root", type=str, default="./data", help="DATASET.ROOT: where the dataset lives")
    parser.add_argument("-bs", "--batch-size", type=int, default=64)
    parser.add_argument("-j", "--num-workers", type=int, default=2, help="DATASET.NUM_WORKERS")
    parser.add_argument("--no-ndam", action="store_true",
                        help="a LAKD student's weights without its NDAM: what a plain model of them scores")
    args = parser.parse_args(argv)

    try:
        cfg = load_cfg(None, ["DATASET.TYPE", args.dataset, "DATASET.ROOT", args.root,
                              "DATASET.TEST.BATCH_SIZE", args.batch_size, "DATASET.NUM_WORKERS", args.num_workers])
        _, val_loader, _, num_classes = get_dataset(cfg)
        model = load_model(args.model, args.ckpt, args.dataset, num_classes, with_ndam=not args.no_ndam)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    result = validate(val_loader, lambda image: model(image)[0], device)
    print(log_msg(f"Top-1: {result.top1:.2f}| Top-5: {result.top5:.2f}| Loss: {result.loss:.4f}", "EVAL"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
