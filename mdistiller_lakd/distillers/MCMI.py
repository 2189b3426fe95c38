"""MCMI: fine-tune a trained teacher to maximise its log-likelihood and its conditional mutual
information (Ye et al., "Bayes conditional distribution estimation for knowledge distillation",
ICLR 2024). The fine-tuned model (the run's ``student_best``) is then the teacher of any KD method.

The loss is ``CE(f(x), y) − λ · mean_i KL(p_i || Q_{y_i})`` with Q the per-class centroids (mean
softmax outputs): set by a train-mode pass over the training set at the start of a fresh run, then
fixed (the released recipe) or moved each step by an EMA over images of a per-class pool.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..engine.checkpoint import load_checkpoint, load_weights
from ..engine.metrics import CMIAccumulator
from ..models import cifar_model_dict
from ._base import CompileTarget, Distiller


def check_mcmi_config(cfg) -> None:
    """ValueError naming the key of an MCMI setting that cannot be used."""
    node = cfg.MCMI
    if node.LOSS.CMI_WEIGHT < 0:
        raise ValueError(
            f"MCMI.LOSS.CMI_WEIGHT is {node.LOSS.CMI_WEIGHT}: λ ≥ 0 maximises the CMI; the reference's "
            "`--param 1 -0.15` is CMI_WEIGHT 0.15"
        )
    if not 0 <= node.CENTROID_DECAY < 1:
        raise ValueError(f"MCMI.CENTROID_DECAY must be in [0, 1), got {node.CENTROID_DECAY}")
    if node.UPDATE_CENTROIDS and not 1 <= node.SAMPLES_PER_CLASS <= node.POOL_PER_CLASS:
        raise ValueError(
            f"MCMI.SAMPLES_PER_CLASS must be between 1 and MCMI.POOL_PER_CLASS ({node.POOL_PER_CLASS}), "
            f"got {node.SAMPLES_PER_CLASS}"
        )


class MCMI(Distiller):
    """``MCMI(student, None, cfg, num_classes, class_pool=None)``: ``student`` holds the trained
    weights to fine-tune; ``class_pool`` [C, n, 3, H, W] (normalised like training batches) is
    needed with ``MCMI.UPDATE_CENTROIDS`` only."""

    requires_teacher = False
    rank_synced_buffers = ("class_pool",)  # the same images on every rank (built from its own seed)

    def __init__(self, student: nn.Module, teacher: None, cfg, num_classes: int, class_pool: torch.Tensor | None = None):
        if teacher is not None:
            raise ValueError("MCMI fine-tunes one model: it takes no teacher (DISTILLER.TEACHER is not read)")
        check_mcmi_config(cfg)
        super().__init__(student, None)
        self.num_classes = num_classes
        self.ce_loss_weight = cfg.MCMI.LOSS.CE_WEIGHT
        self.cmi_loss_weight = cfg.MCMI.LOSS.CMI_WEIGHT
        self.update_each_step = cfg.MCMI.UPDATE_CENTROIDS
        self.decay = cfg.MCMI.CENTROID_DECAY
        self.samples_per_class = cfg.MCMI.SAMPLES_PER_CLASS
        if self.update_each_step:
            if class_pool is None:
                raise ValueError("MCMI.UPDATE_CENTROIDS needs a per-class pool of training images (class_pool)")
            if class_pool.dim() != 5 or class_pool.size(0) != num_classes or class_pool.size(1) < self.samples_per_class:
                raise ValueError(
                    f"class_pool must be [{num_classes}, n >= MCMI.SAMPLES_PER_CLASS ({self.samples_per_class}), "
                    f"3, H, W], got {tuple(class_pool.shape)}"
                )
            # Stored as [C·n, 3, H, W]: a 4-D tensor follows the trainer's channels_last conversion.
            class_pool = class_pool.flatten(0, 1)
        self.pool_per_class = 0 if class_pool is None else class_pool.size(0) // num_classes
        # Non-persistent: at CIFAR-100 scale the pool is 614 MB, rebuilt from the data on every start.
        self.register_buffer("class_pool", class_pool, persistent=False)
        self.register_buffer("centroids", torch.full((num_classes, num_classes), 1.0 / num_classes))

    @classmethod
    def build_kwargs(cls, cfg, student: nn.Module, num_classes: int, num_data: int) -> dict:
        """Loads the weights to fine-tune (``MCMI.INIT_CKPT``, else the released teacher of
        ``DISTILLER.STUDENT``) into ``student``; builds the class pool when it is used."""
        check_mcmi_config(cfg)
        name, path = cfg.DISTILLER.STUDENT, cfg.MCMI.INIT_CKPT
        if not path and cfg.DATASET.TYPE == "cifar100" and name in cifar_model_dict:
            path = cifar_model_dict[name][1]
        if not path:
            raise ValueError(
                f"MCMI.INIT_CKPT is empty and '{name}' has no released {cfg.DATASET.TYPE} teacher: set "
                "MCMI.INIT_CKPT to a trained checkpoint (fine-tuning random weights is not MCMI)"
            )
        if not os.path.isfile(path):
            source = "MCMI.INIT_CKPT" if cfg.MCMI.INIT_CKPT else f"MCMI.INIT_CKPT (empty: the released '{name}' teacher)"
            raise ValueError(f"{source}: checkpoint not found: {path}; set MCMI.INIT_CKPT to a trained checkpoint")
        try:
            load_weights(student, load_checkpoint(path), path, name)
        except ValueError as error:  # CheckpointError: unreadable, or another architecture
            raise ValueError(f"MCMI.INIT_CKPT: {error}") from None
        pool = None
        if cfg.MCMI.UPDATE_CENTROIDS:
            from ..dataset import class_pool  # the dataset package imports the engine, which imports us

            pool = class_pool(cfg, cfg.MCMI.POOL_PER_CLASS, seed=max(cfg.EXPERIMENT.SEED, 0))
        return {"num_classes": num_classes, "class_pool": pool}

    def on_train_start(self, train_loader) -> dict[str, float]:
        return {"initial_cmi": self.init_centroids(train_loader)}

    @torch.no_grad()
    def init_centroids(self, loader) -> float:
        """Q_c = the mean softmax of class c over one pass of ``loader`` with the student in train
        mode (BatchNorm on batch statistics, running statistics moving, as the reference); returns
        the CMI of that pass against these centroids. Sums are all-reduced under torchrun."""
        was_training = self.student.training
        self.student.train()
        device = self.centroids.device
        stats = CMIAccumulator()
        for batch in loader:
            image, target = batch[0].to(device).float(), batch[1].to(device)
            stats.update(self.student(image)[0].float(), target)
        self.student.train(was_training)
        if stats.counts is None:
            raise ValueError("init_centroids: the loader yielded no batch")
        if dist.is_available() and dist.is_initialized():
            for tensor in (stats.class_sums, stats.counts, stats.entropy_sum):
                dist.all_reduce(tensor)
        empty = (stats.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"init_centroids: no training sample of classes {empty}; their centroids are undefined")
        self.centroids.copy_(stats.class_sums / stats.class_sums.sum(1, keepdim=True))
        return stats.compute()

    @torch.no_grad()
    def update_centroids(self, images: torch.Tensor) -> None:
        """One EMA step from ``images`` [C, s, 3, H, W] (class-major), forwarded in the student's
        current mode: Q ← d·Q + (1 − d)·M with M_c their mean softmax, then rows renormalised."""
        num_classes, samples = images.shape[:2]
        probabilities = F.softmax(self.student(images.flatten(0, 1))[0].float(), dim=1)
        means = probabilities.view(num_classes, samples, -1).mean(1)
        self.centroids.mul_(self.decay).add_(means, alpha=1.0 - self.decay)
        self.centroids.div_(self.centroids.sum(1, keepdim=True))

    def draw_pool_images(self) -> torch.Tensor:
        """``class_pool[:, idx]``, idx the first SAMPLES_PER_CLASS of one permutation of the pool
        (global RNG: the same draw on every rank, replayed by a resumed run)."""
        idx = torch.randperm(self.pool_per_class, device=self.class_pool.device)[: self.samples_per_class]
        return self.class_pool.unflatten(0, (self.num_classes, self.pool_per_class))[:, idx]

    def compile_plan(self) -> tuple[list[CompileTarget], str]:
        return self.models_only_plan(
            "it draws pool images with the global "
            "RNG and moves its centroids inside the forward"
        )

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        logits, _ = self.student(image)
        if self.update_each_step:  # after the batch's forward, before the loss reads Q (the reference's order)
            self.update_centroids(self.draw_pool_images())
        log_p = F.log_softmax(logits.float(), dim=1)
        log_centroids = self.centroids[target].log()  # true-label rows, no gradient (a buffer)
        cmi = (log_p.exp() * (log_p - log_centroids)).sum(1).mean()
        return logits, {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits, target),
            "loss_cmi": -self.cmi_loss_weight * cmi,
        }
