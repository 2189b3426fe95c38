"""The training loop shared by every distiller (upstream mdistiller's BaseTrainer/CRDTrainer behaviour).

Output folder ``LOG.PREFIX/<experiment name>`` (see ``utils.experiment_name``):
``worklog.txt`` (upstream's per-epoch blocks), ``train.events/`` (tensorboard), ``config.yaml`` (the
run's full config), and checkpoints
``latest``, ``best``, ``epoch_N`` (whole distiller, optimizer, epoch, best accuracy, RNG states) and
``student_latest``, ``student_best``, ``student_N`` (the student's weights, architecture, dataset).
``latest`` is written last in an epoch: it is the point a killed run resumes from. A signal
(SIGTERM, SIGINT, SIGUSR1, SIGUSR2) or ``SOLVER.CHECKPOINT_MINUTES`` also writes it at a step
boundary, with the epoch's position (``preemption.py``, ``resumable.py``); a signal then ends the run
(``TrainingStopped``), and a resume continues at the next step, bit-exactly on the CPU.
A fresh run (not a resumed one) first calls the distiller's ``on_train_start(train_loader)`` and
logs what it returns (MCMI: its initial centroids and CMI); every epoch logs ``test_cmi``, the
conditional mutual information of the validation outputs. A distiller's ``epoch_metrics`` join the
worklog and tensorboard, its ``epoch_images`` grids go to ``<folder>/epoch_N.png`` and tensorboard.

Under torchrun (``distributed.py``) every rank trains on its share of each global batch and
validates on the whole validation set; only the main rank writes logs, config and checkpoints.
``SOLVER.AMP`` runs forward passes (training and validation) under ``torch.autocast``, with a
``GradScaler`` for fp16; ``SOLVER.CHANNELS_LAST`` puts models and images in channels_last;
``SOLVER.COMPILE`` compiles what the distiller's ``compile_plan`` allows (``compile.py``).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision
from tensorboardX import SummaryWriter
from tqdm import tqdm
from yacs.config import CfgNode

from ..dataset import normalization
from .cfg import ConfigError
from . import distributed
from .checkpoint import atomic_write, load_checkpoint, remove_stale_temp_files, save_checkpoint
from .compile import compile_for_training
from .metrics import extracurricular_knowledge, top1_agreement
from .preemption import CONTINUE, STOP, StopSignals, TrainingStopped
from .resumable import resumable_loader
from .steps import SUPPORTED_TRAINERS, build_optimizer, build_step, retains_graph
from .utils import (
    AverageMeter, accuracy, amp_dtype, get_rng_state, learning_rate, log_msg, set_rng_state, validate,
)

# Names of the items of a training batch, in loader order; CRD's loader adds the last one.
BATCH_ITEMS = ("image", "target", "index", "contrastive_index")
WORKLOG_RULE = "-" * 25  # separates the worklog's per-epoch blocks, as upstream
WORKLOG_DIGITS = {"test_cmi": 4}  # decimals of a worklog value; upstream's 2 for the others


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stops and its last checkpoint stays as it was."""


class Trainer:
    """Trains ``distiller`` with SGD over its learnable parameters, validating after every epoch.

    ``train()`` runs the epochs; ``train_epoch`` is one epoch (training pass, validation, logs,
    checkpoints); ``train_step`` is one optimisation step. ``device`` defaults to
    ``distributed.training_device()``.
    """

    def __init__(
        self,
        experiment_name: str,
        distiller: nn.Module,
        train_loader,
        val_loader,
        cfg: CfgNode,
        device: torch.device | None = None,
    ):
        if cfg.SOLVER.TYPE != "SGD":
            raise ConfigError(f"SOLVER.TYPE: only SGD is supported, got '{cfg.SOLVER.TYPE}'")
        if cfg.SOLVER.TRAINER not in SUPPORTED_TRAINERS:
            raise ConfigError(f"SOLVER.TRAINER: '{cfg.SOLVER.TRAINER}' is not supported ({', '.join(SUPPORTED_TRAINERS)})")
        learning_rate(cfg, 1)  # an unknown SOLVER.SCHEDULER fails here, before any training
        self.cfg = cfg
        self.device = device or distributed.training_device()
        self.amp_dtype = amp_dtype(cfg.SOLVER.AMP, self.device)
        self.memory_format = torch.channels_last if cfg.SOLVER.CHANNELS_LAST else torch.preserve_format
        self.distiller = distiller.to(self.device, memory_format=self.memory_format)
        # SOLVER.COMPILE, in place
        self.compile_report = compile_for_training(self.distiller, cfg, self.device, retains_graph(cfg))
        # `model` is what a training step calls (the distiller, or DDP around it); `after_backward`
        # averages gradients across ranks where DDP cannot (distillers with a local backward).
        self.model, self.after_backward = distributed.prepare_for_training(self.distiller, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if getattr(distiller, "local_backward", False):
            distiller.grad_scaler = self.scaler  # its local losses must be scaled like the final one
        self.train_loader = resumable_loader(distributed.shard_train_loader(train_loader, cfg.EXPERIMENT.SEED))
        self.val_loader = val_loader
        self.is_main = distributed.is_main_process()
        self.optimizer = build_optimizer(cfg, distiller)
        # The backward pass(es) and step of SOLVER.TRAINER (dot: the task loss apart).
        self.optimization_step = build_step(cfg, self)
        self.best_acc = -1.0
        self.teacher_predictions = None  # (predictions, targets) on the validation set, computed once
        self.vis_images = None  # the validation images of the distiller's epoch_images, fetched once
        self.clock = time.perf_counter  # what timings read; tests substitute a fake clock
        self.stop_signals = StopSignals(cfg.SOLVER.CHECKPOINT_MINUTES, self.device, lambda: self.clock())
        self.resume_position = None  # a mid-epoch `latest`'s position, for the next train_pass

        self.log_path = os.path.join(cfg.LOG.PREFIX, experiment_name)
        self.worklog_path = os.path.join(self.log_path, "worklog.txt")
        self.tf_writer, self.wandb = None, None
        if self.is_main:
            os.makedirs(self.log_path, exist_ok=True)
            remove_stale_temp_files(self.log_path)
            # The full config the run trains with, for analysis tools (loads back with load_cfg).
            atomic_write(os.path.join(self.log_path, "config.yaml"), lambda f: f.write(cfg.dump().encode()))
            self.tf_writer = SummaryWriter(os.path.join(self.log_path, "train.events"))
            self.wandb = self._init_wandb(experiment_name)

    def _init_wandb(self, experiment_name: str):
        if not self.cfg.LOG.WANDB:
            return None
        try:
            import wandb

            wandb.init(project=self.cfg.EXPERIMENT.PROJECT, name=experiment_name, tags=self.cfg.EXPERIMENT.TAG.split(","))
            return wandb
        except Exception as error:  # a missing package, no login, no network: the run goes on
            warnings.warn(f"LOG.WANDB: wandb is unavailable ({error!r}); logging to tensorboard and worklog.txt only")
            return None

    # ----------------------------------------------------------------------------------------------
    # The loop

    def train(self, resume: bool = False) -> None:
        """Train epochs 1..SOLVER.EPOCHS, or, with ``resume``, the epochs after ``latest``'s."""
        first_epoch = self._resume() + 1 if resume else self._start_fresh()
        self._log_compile()
        with self.stop_signals:
            for epoch in range(first_epoch, self.cfg.SOLVER.EPOCHS + 1):
                self.train_epoch(epoch)
                self.stop_signals.checkpointed()  # `latest` was just written
                if epoch < self.cfg.SOLVER.EPOCHS and self.stop_signals.decide() == STOP:
                    self._stop(f"after epoch {epoch}")
        if not self.is_main:
            return
        print(log_msg(f"Best accuracy:{self.best_acc}", "EVAL"))
        with open(self.worklog_path, "a") as worklog:
            worklog.write(f"best_acc\t{self.best_acc:.2f}\n")
        self.tf_writer.close()

    def train_epoch(self, epoch: int) -> None:
        """Train one epoch, validate, log, and save the checkpoints."""
        lr = learning_rate(self.cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        meters = self.train_pass(epoch)
        log_dict = OrderedDict(train_acc=meters["top1"].avg, train_loss=meters["loss"].avg)
        log_dict.update(self.evaluate())
        improved = log_dict["test_acc"] >= self.best_acc
        self.best_acc = max(self.best_acc, log_dict["test_acc"])
        # The hooks may draw random numbers: training's sequence (and what a resume replays) must not
        # depend on whether they are logged.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            method_metrics = self._method_metrics()
            self._write_epoch_images(epoch)
        self._log_epoch(epoch, lr, log_dict, meters, method_metrics)
        self._save(epoch, improved)

    def train_pass(self, epoch: int) -> dict[str, AverageMeter]:
        """One pass over the training set; returns the epoch's meters: ``data_time`` (waiting for
        batches), ``train_time`` (steps), ``loss``, ``top1``, ``top5`` and ``train_losses/<key>`` for
        each term of the distiller's losses_dict."""
        meters = {name: AverageMeter() for name in ("data_time", "train_time", "loss", "top1", "top5")}
        set_epoch = getattr(self.train_loader, "set_epoch", None)
        if set_epoch is not None:  # the epoch's shuffle (tensor pipeline, DistributedSampler): resumes repeat it
            set_epoch(epoch)
        num_iter = len(self.train_loader)
        position, self.resume_position = self.resume_position, None
        first = self._continue_from(position, meters) if position else 0
        bar = tqdm(total=num_iter, initial=first, leave=False, disable=not self.is_main)
        self.model.train()
        batches = iter(self.train_loader)
        if position:  # the RNG as at the stopped step, which came after the iterator's own draws
            set_rng_state(position["rng"])
        step_end = self.clock()
        for iteration, batch in enumerate(batches, first):
            arrival = self.clock()
            meters["data_time"].update(arrival - step_end)  # the wait for this batch
            logits, target, loss_values = self.train_step(batch, epoch, iteration)
            step_end = self.clock()
            meters["train_time"].update(step_end - arrival)

            batch_size = target.size(0)
            acc1, acc5 = accuracy(logits, target, topk=(1, 5))
            total_loss = sum(loss_values.values())
            for name, value in (("loss", total_loss), ("top1", acc1), ("top5", acc5)):
                meters[name].update(value, batch_size)
            for key, value in loss_values.items():
                meters.setdefault(f"train_losses/{key}", AverageMeter()).update(value, batch_size)
            self._log_iteration((epoch - 1) * num_iter + iteration + 1, {"loss": total_loss, "top1": acc1, **loss_values})
            bar.set_description(log_msg(
                f"Epoch:{epoch}| Time(data):{meters['data_time'].avg:.3f}| Time(train):{meters['train_time'].avg:.3f}|"
                f" Loss:{meters['loss'].avg:.4f}| Top-1:{meters['top1'].avg:.3f}| Top-5:{meters['top5'].avg:.3f}",
                "TRAIN",
            ))
            bar.update()
            self._checkpoint_if_asked(epoch, iteration + 1, meters)
        bar.close()
        return meters

    def train_step(self, batch, epoch: int, iteration: int):
        """One optimisation step on ``batch``; returns the logits (detached), the targets and the
        mean of each loss term as floats. Raises ``NonFiniteLossError`` before updating any weight."""
        inputs = {name: item.to(self.device, non_blocking=True) for name, item in zip(BATCH_ITEMS, batch)}
        inputs["image"] = self._prepare_image(inputs["image"])
        # Zeroed before the forward pass: a distiller may back-propagate some terms inside it.
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits, losses_dict = self.model(epoch=epoch, **inputs)
        loss_values = self._loss_values(losses_dict)
        self._check_finite(loss_values, epoch, iteration)
        self.optimization_step(losses_dict)
        return logits.detach(), inputs["target"], loss_values

    def autocast(self) -> torch.autocast:
        """Mixed precision of SOLVER.AMP on the training device (disabled when it is empty)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _prepare_image(self, image: torch.Tensor) -> torch.Tensor:
        return image.float().to(memory_format=self.memory_format)

    def _loss_values(self, losses_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """The mean of each term, averaged over the ranks (so that every rank sees a non-finite
        loss at once), in one device-to-host copy."""
        terms = torch.stack([term.detach().mean().float() for term in losses_dict.values()])
        return dict(zip(losses_dict, distributed.mean_across_ranks(terms).tolist()))

    def _check_finite(self, loss_values: dict[str, float], epoch: int, iteration: int) -> None:
        bad = {key: value for key, value in loss_values.items() if not math.isfinite(value)}
        if bad:
            kept = os.path.join(self.log_path, "latest")
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, iteration {iteration + 1}/{len(self.train_loader)}: "
                + ", ".join(f"{key}={value}" for key, value in bad.items())
                + f". Training stopped; the last good checkpoint is {kept}"
                + ("" if os.path.exists(kept) else " (none written yet)")
                + ". Lower SOLVER.LR or the loss weights, then resume with --resume."
            )

    def evaluate(self) -> OrderedDict:
        """Upstream's validation metrics and, for a distiller with a teacher, EK and agreement."""
        self.distiller.eval()
        # DDP leaves each rank with the BatchNorm statistics of its own last batch.
        distributed.broadcast_from_main(distributed.student_side_buffers(self.distiller))
        student = validate(self.val_loader, self._logits_of(lambda image: self.distiller(image=image)), self.device,
                           progress=self.is_main)
        metrics = OrderedDict(test_acc=student.top1, test_acc_top5=student.top5, test_loss=student.loss,
                              test_cmi=student.cmi)
        teacher = getattr(self.distiller, "teacher", None)
        if teacher is not None:
            teacher_pred, targets = self._teacher_predictions(teacher)
            if not torch.equal(targets, student.targets):
                raise RuntimeError("the validation loader changed its order between epochs; it must not shuffle")
            metrics["test_ek"] = extracurricular_knowledge(student.predictions, teacher_pred, targets)
            metrics["test_agreement"] = top1_agreement(student.predictions, teacher_pred)
        return metrics

    def _teacher_predictions(self, teacher: nn.Module):
        if self.teacher_predictions is None:
            teacher.eval()
            result = validate(self.val_loader, self._logits_of(lambda image: teacher(image)[0]), self.device,
                              desc="teacher ", progress=self.is_main)
            if self.is_main:
                print(log_msg(f"Teacher top-1 on the validation set: {result.top1:.2f}", "INFO"))
            self.teacher_predictions = (result.predictions, result.targets)
        return self.teacher_predictions

    def _logits_of(self, forward):
        """``forward`` on validation images under the training's autocast and memory format;
        float32 logits."""
        def logits_of(image: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return forward(self._prepare_image(image)).float()

        return logits_of

    # ----------------------------------------------------------------------------------------------
    # Logging

    def _method_metrics(self) -> dict[str, float]:
        """The distiller's ``epoch_metrics``, averaged across ranks."""
        metrics = self.distiller.epoch_metrics()
        if not metrics:
            return {}
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        return dict(zip(metrics, distributed.mean_across_ranks(values).tolist()))

    def _epoch_images(self) -> torch.Tensor:
        """The first ``num_epoch_images`` validation images (the loader does not shuffle), once."""
        if self.vis_images is None:
            wanted, batches = self.distiller.num_epoch_images, []
            for batch in self.val_loader:
                batches.append(batch[0])
                if sum(map(len, batches)) >= wanted:
                    break
            self.vis_images = self._prepare_image(torch.cat(batches)[:wanted].to(self.device))
        return self.vis_images

    def _write_epoch_images(self, epoch: int) -> None:
        """The distiller's ``epoch_images`` grids, denormalised: ``<run>/<folder>/epoch_<N>.png`` and
        tensorboard images (main rank only)."""
        if not self.is_main or self.distiller.num_epoch_images <= 0:
            return
        was_training = self.distiller.training
        self.distiller.eval()
        with torch.no_grad():
            grids = self.distiller.epoch_images(self._epoch_images())
        self.distiller.train(was_training)
        mean, std = (
            torch.tensor(v, device=self.device).view(1, -1, 1, 1) for v in normalization(self.cfg.DATASET.TYPE)
        )
        for grid in grids:
            images = (grid.rows.flatten(0, 1).float() * std + mean).clamp(0, 1)
            picture = torchvision.utils.make_grid(images.cpu(), nrow=grid.rows.shape[1])
            folder = os.path.join(self.log_path, grid.folder)
            os.makedirs(folder, exist_ok=True)
            atomic_write(os.path.join(folder, f"epoch_{epoch}.png"),
                         lambda f: torchvision.utils.save_image(picture, f, format="png"))
            self.tf_writer.add_image(grid.tag, picture, epoch)

    def _log_iteration(self, step: int, values: dict[str, float]) -> None:
        if self.is_main and step % self.cfg.LOG.TENSORBOARD_FREQ == 0:
            lr = self.optimizer.param_groups[0]["lr"]
            for key, value in {"lr": lr, **values}.items():
                self.tf_writer.add_scalar(f"iter/{key}", value, step)

    def _log_start(self, metrics: dict[str, float]) -> None:
        """What the distiller measured before training (``on_train_start``): console, tensorboard at
        step 0, and ``key: value`` lines at the top of the worklog, outside the epoch blocks."""
        if not self.is_main or not metrics:
            return
        for key, value in metrics.items():
            print(log_msg(f"Before training: {key} {value:.4f}", "INFO"))
            self.tf_writer.add_scalar(key, value, 0)
        with open(self.worklog_path, "a") as worklog:
            worklog.write("".join(f"{key}: {value:.4f}\n" for key, value in metrics.items()))

    def _log_compile(self) -> None:
        """SOLVER.COMPILE's report (what was compiled, what runs eagerly and why), once per run."""
        if not self.is_main or not self.compile_report:
            return
        print(log_msg(f"SOLVER.COMPILE: {self.compile_report}", "INFO"))
        with open(self.worklog_path, "a") as worklog:
            worklog.write(f"compile: {self.compile_report}\n")

    def _log_epoch(
        self, epoch: int, lr: float, log_dict: OrderedDict, meters: dict[str, AverageMeter],
        method_metrics: dict[str, float],
    ) -> None:
        if not self.is_main:
            return
        scalars = {**log_dict, "lr": lr, **method_metrics}
        scalars.update({key: meter.avg for key, meter in meters.items() if key.startswith("train_losses/")})
        scalars.update({"time/data": meters["data_time"].avg, "time/train": meters["train_time"].avg})
        for key, value in scalars.items():
            self.tf_writer.add_scalar(key, value, epoch)
        self.tf_writer.flush()
        if self.wandb is not None:
            self.wandb.log({"current lr": lr, **scalars})
            self.wandb.run.summary["best_acc"] = self.best_acc
        # Upstream's worklog.txt block, which its tools and ours parse, then each loss term's epoch
        # mean (LAKD's L_k, CE, CAT: the paper's Figure 5) as extra `train_<term>` lines, then the
        # distiller's epoch_metrics.
        lines = [WORKLOG_RULE, f"epoch: {epoch}", f"lr: {lr:.2f}"]
        lines += [f"{key}: {value:.{WORKLOG_DIGITS.get(key, 2)}f}" for key, value in log_dict.items()]
        lines += [
            f"train_{key[len('train_losses/'):]}: {meter.avg:.4f}"
            for key, meter in meters.items() if key.startswith("train_losses/")
        ]
        lines += [f"{key}: {value:.4f}" for key, value in method_metrics.items()]
        lines.append(WORKLOG_RULE)
        with open(self.worklog_path, "a") as worklog:
            worklog.write("\n".join(lines) + "\n")

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def _student_checkpoint(self) -> dict:
        checkpoint = {
            "model": self.distiller.student.state_dict(),
            "arch": self.cfg.DISTILLER.STUDENT,
            "dataset": self.cfg.DATASET.TYPE,
        }
        extras = getattr(self.distiller, "student_checkpoint_extras", None)
        if extras is not None:
            checkpoint.update(extras())
        return checkpoint

    def _training_state(self, epochs_done: int) -> dict:
        return {
            "epoch": epochs_done,
            "model": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),  # fp16's loss scale; empty otherwise
            "best_acc": self.best_acc,
            "rng": get_rng_state(),
        }

    def _save(self, epoch: int, improved: bool) -> None:
        if not self.is_main:
            return
        state = self._training_state(epoch)
        student = self._student_checkpoint()
        files = []
        if improved:
            files += [("best", state), ("student_best", student)]
        if epoch % self.cfg.LOG.SAVE_CHECKPOINT_FREQ == 0:
            files += [(f"epoch_{epoch}", state), (f"student_{epoch}", student)]
        # `latest` last: a run killed before it is written redoes this epoch and rewrites the rest.
        files += [("student_latest", student), ("latest", state)]
        for name, obj in files:
            save_checkpoint(obj, os.path.join(self.log_path, name))

    def _checkpoint_if_asked(self, epoch: int, steps_done: int, meters: dict[str, AverageMeter]) -> None:
        """At a step boundary: a mid-epoch `latest` when the clock or a signal asks for one (every
        rank agrees); after a signal the run then stops."""
        action = self.stop_signals.decide()
        if action == CONTINUE:
            return
        if self.is_main:
            state = self._training_state(epoch - 1)
            state["position"] = {
                "epoch": epoch, "step": steps_done, "loader": self.train_loader.position_state(),
                "meters": {name: vars(meter).copy() for name, meter in meters.items()},
            }
            save_checkpoint(state, os.path.join(self.log_path, "latest"))
        self.stop_signals.checkpointed()
        if action == STOP:
            self._stop(f"at epoch {epoch}, step {steps_done}/{len(self.train_loader)}")

    def _stop(self, where: str) -> None:
        if self.is_main:
            self.tf_writer.flush()
        raise TrainingStopped(
            f"stopped by {self.stop_signals.signal_name} {where}; {os.path.join(self.log_path, 'latest')} holds "
            "the run there: continue it with --resume"
        )

    def _continue_from(self, position: dict, meters: dict[str, AverageMeter]) -> int:
        """Restore the epoch's meters and the loader's position from a mid-epoch `latest`; returns
        the number of steps it had done."""
        for name, values in position["meters"].items():
            meters.setdefault(name, AverageMeter()).__dict__.update(values)
        self.train_loader.resume_at(position["step"], position["loader"])
        return position["step"]

    def _start_fresh(self) -> int:
        if self.is_main and os.path.exists(os.path.join(self.log_path, "latest")):
            print(log_msg(f"Overwriting the run in {self.log_path} (pass --resume to continue it)", "INFO"))
        if self.is_main and os.path.exists(self.worklog_path):
            os.remove(self.worklog_path)  # the overwritten run's lines, those before its epochs too
        self._log_start(self.distiller.on_train_start(self.train_loader))
        return 1

    def _resume(self) -> int:
        """Restore ``latest``; returns its epoch."""
        path = os.path.join(self.log_path, "latest")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {path}; start without --resume")
        state = load_checkpoint(path)
        self.distiller.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        self.best_acc = state["best_acc"]
        set_rng_state(state["rng"])
        self._truncate_worklog(last_epoch=state["epoch"])
        position = state.get("position")  # only in a mid-epoch `latest`
        if position:
            self.resume_position = {**position, "rng": state["rng"]}
        if self.is_main:
            where = (f"at epoch {position['epoch']}, step {position['step']}" if position
                     else f"after epoch {state['epoch']}")
            print(log_msg(f"Resuming {self.log_path} {where}", "INFO"))
        return state["epoch"]

    def _truncate_worklog(self, last_epoch: int) -> None:
        """Drop the worklog blocks of epochs after ``last_epoch`` (logged by a run that was killed
        before it saved them) and the final best_acc line, so resuming never logs an epoch twice."""
        if not self.is_main or not os.path.exists(self.worklog_path):
            return
        with open(self.worklog_path) as worklog:
            lines = worklog.read().splitlines(keepends=True)
        keep = len(lines)
        for i, line in enumerate(lines):
            if line.startswith("best_acc"):
                keep = i
                break
            if line.startswith("epoch: ") and int(line.split(":")[1]) > last_epoch:
                keep = i - 1 if i > 0 and lines[i - 1].strip() == WORKLOG_RULE else i
                break
        atomic_write(self.worklog_path, lambda f: f.write("".join(lines[:keep]).encode()))
