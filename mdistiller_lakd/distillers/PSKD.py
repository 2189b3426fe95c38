"""PS-KD: self-knowledge distillation with progressive refinement of targets (Kim et al., ICCV
2021), teacherless, as lgcnsai/PS-KD-Pytorch's ``main.py`` and ``Custom_CrossEntropy_PSKD``."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import check_class_targets, ignored_teacher, probe


def all_gather_rows(index: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(index, rows)`` concatenated, on every rank (ranks may hold different batch
    sizes: each pads to the largest, then the padding is dropped); the inputs without a group."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return index, rows
    world = dist.get_world_size()
    size = torch.tensor([len(index)], device=index.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    largest = max(sizes)
    padded_index = index.new_zeros(largest)
    padded_index[: len(index)] = index
    padded_rows = rows.new_zeros(largest, rows.shape[1])
    padded_rows[: len(rows)] = rows
    indices = [torch.empty_like(padded_index) for _ in range(world)]
    gathered = [torch.empty_like(padded_rows) for _ in range(world)]
    dist.all_gather(indices, padded_index)
    dist.all_gather(gathered, padded_rows)
    return torch.cat([t[:n] for t, n in zip(indices, sizes)]), torch.cat([t[:n] for t, n in zip(gathered, sizes)])


class PSKD(Distiller):
    """Soft cross-entropy against targets that mix the one-hot label with the student's own
    softmax of the previous epoch, the mix growing linearly to ``PSKD.ALPHA_T`` at the last epoch.

    ``predictions`` [num_data, num_classes] holds each training sample's latest softmax (row =
    the loader's ``index``); a persistent buffer, so checkpoints carry it and ``--resume`` goes on
    from it. Under torchrun every rank writes every rank's rows, so all hold the same buffer.
    """

    requires_teacher = False
    rank_synced_buffers = ("predictions",)

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None = None, cfg=None, num_data: int = 0,
        num_classes: int | None = None,
    ):
        super().__init__(student, ignored_teacher("PSKD", teacher))
        if not 0.0 <= cfg.PSKD.ALPHA_T <= 1.0:
            raise ValueError(f"PSKD.ALPHA_T must lie in [0, 1], got {cfg.PSKD.ALPHA_T}")
        if num_data <= 0:
            raise ValueError(
                f"PSKD needs the training-set size num_data (> 0) for its prediction buffer, got {num_data}"
            )
        self.alpha_final = cfg.PSKD.ALPHA_T
        self.epochs = cfg.SOLVER.EPOCHS
        self.num_data = num_data
        if num_classes is None:
            num_classes = probe(student, cfg.DATASET.TYPE)[0].shape[1]
        self.register_buffer("predictions", torch.zeros(num_data, num_classes))

    @classmethod
    def build_kwargs(cls, cfg, student: nn.Module, num_classes: int, num_data: int) -> dict:
        return {"num_data": num_data, "num_classes": num_classes}

    def alpha(self, epoch: int) -> float:
        """alpha_t = ALPHA_T * t / SOLVER.EPOCHS for the 1-based epoch t."""
        return self.alpha_final * min(max(epoch / self.epochs, 0.0), 1.0)

    def soft_targets(self, target: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """The (N x C) targets of samples ``index`` with labels ``target`` at ``epoch``: one-hot at
        epoch 1, else ``(1 - alpha_t) * onehot + alpha_t * predictions[index]``. Reads only."""
        one_hot = F.one_hot(target, self.predictions.shape[1]).float()
        if epoch <= 1:
            return one_hot
        alpha = self.alpha(epoch)
        return (1 - alpha) * one_hot + alpha * self.predictions[index]

    def _check_batch(self, target: torch.Tensor, index: torch.Tensor | None) -> None:
        if index is None:
            raise ValueError(
                "PSKD needs each sample's dataset index: the training loader must yield (image, target, index)"
            )
        check_class_targets("PSKD", target)
        outside = (index < 0) | (index >= self.num_data)
        if outside.any():
            raise ValueError(
                f"PSKD: sample index {int(index[outside][0])} is outside the prediction buffer's "
                f"[0, num_data={self.num_data}): was the buffer built for another dataset?"
            )

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, epoch: int, index: torch.Tensor | None = None,
                      **kwargs):
        self._check_batch(target, index)
        logits, _ = self.student(image)
        if logits.shape[1] != self.predictions.shape[1]:
            raise ValueError(
                f"PSKD: the student gives {logits.shape[1]} logits but the prediction buffer holds "
                f"{self.predictions.shape[1]} classes"
            )
        targets = self.soft_targets(target, index, epoch)  # read before this step's write
        logits_float = logits.float()
        loss = -(targets * F.log_softmax(logits_float, dim=1)).sum(1).mean()
        with torch.no_grad():
            written_index, written = all_gather_rows(index, F.softmax(logits_float, dim=1))
            self.predictions[written_index] = written
        return logits, {"loss_pskd": loss}
