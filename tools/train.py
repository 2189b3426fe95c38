"""Train a student: ``python tools/train.py --cfg configs/cifar100/lakd/res56_res20.yaml [--resume] [KEY VALUE ...]``.

The run holds its folder's lock (mdistiller_lakd/engine/runlock.py) from the start to the end: a
second train.py on the same folder stops at once, naming the holder, with exit status 2.

On several GPUs (or CPU processes): ``torchrun --nproc_per_node=N tools/train.py --cfg ...``, with
SOLVER.BATCH_SIZE the global batch (see mdistiller_lakd/engine/distributed.py).

Exit status: 0 finished, 1 non-finite loss, 2 bad config or files, 75 (``REQUEUE_EXIT_STATUS``)
stopped by a signal after writing a mid-epoch ``latest``: run again with --resume (docs/preemption.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from mdistiller_lakd.dataset import get_dataset
from mdistiller_lakd.engine import distributed, runlock
from mdistiller_lakd.engine.build import build_distiller
from mdistiller_lakd.engine.cfg import ConfigError, check_values, dump_cfg, load_cfg
from mdistiller_lakd.engine.checkpoint import CheckpointError
from mdistiller_lakd.engine.preemption import REQUEUE_EXIT_STATUS, TrainingStopped
from mdistiller_lakd.engine.trainer import NonFiniteLossError, Trainer
from mdistiller_lakd.engine.utils import experiment_name, log_msg, seed_everything


def first_option_at(opts: list[str]) -> int | None:
    """Where the first ``--option`` stands in a KEY's place (an even position) of the overrides."""
    return next((i for i in range(0, len(opts), 2) if opts[i].startswith("--")), None)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, options also after the overrides (``... SOLVER.EPOCHS 1 --resume``, the
    previous command with ``--resume`` appended): argparse's REMAINDER takes everything after the
    first override, so an option found where a KEY should be is parsed out of it as an option."""
    parser = argparse.ArgumentParser("training for knowledge distillation.")
    parser.add_argument("--cfg", type=str, required=True, help="a YAML config file")
    parser.add_argument("--resume", action="store_true", help="continue the run from its `latest` checkpoint")
    parser.add_argument("--name", help="the run folder under LOG.PREFIX (default: PROJECT/TAG followed by the "
                        "overrides, as upstream names it)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, e.g. SOLVER.LR 0.1")
    args = parser.parse_args(argv)
    while (option_at := first_option_at(args.opts)) is not None:
        overrides = args.opts[:option_at]
        # Parsed into the same namespace: options already read keep their values.
        args = parser.parse_args(["--cfg", args.cfg, *args.opts[option_at:]], namespace=args)
        args.opts = overrides + args.opts
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)

    torch.backends.cudnn.benchmark = True
    lock = None
    try:
        cfg = load_cfg(args.cfg, args.opts)
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always")
            check_values(cfg)  # before any data is read or downloaded
        for note in notes:  # one line each, without warnings' source-line echo
            print(f"warning: {note.message}", file=sys.stderr)
        device = distributed.init_distributed()
        seed_everything(distributed.shared_seed(cfg.EXPERIMENT.SEED))
        verbose = distributed.is_main_process()
        name = args.name or experiment_name(cfg, args.opts)
        run_dir = os.path.join(cfg.LOG.PREFIX, name)
        if verbose:  # the process that writes the folder holds it (under torchrun, the main rank)
            lock = runlock.acquire(run_dir)
            print(log_msg("CONFIG:\n" + dump_cfg(cfg), "INFO"))
        train_loader, val_loader, num_data, num_classes = get_dataset(cfg, device)
        distiller = build_distiller(cfg, num_classes, num_data)
        if verbose and cfg.DISTILLER.TYPE != "NONE":
            print(log_msg(f"Extra parameters of {cfg.DISTILLER.TYPE}: {distiller.get_extra_parameters()}", "INFO"))
        trainer = Trainer(name, distiller, train_loader, val_loader, cfg, device)
        if verbose:
            print(log_msg(f"Run folder: {trainer.log_path}", "INFO"))
        trainer.train(resume=args.resume)
        distributed.shutdown()
    except (ConfigError, CheckpointError, FileNotFoundError, runlock.RunFolderLockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingStopped as stopped:
        distributed.shutdown()  # every rank waits until the main one has written `latest`
        print(log_msg(str(stopped), "INFO"), file=sys.stderr)
        return REQUEUE_EXIT_STATUS
    finally:
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
