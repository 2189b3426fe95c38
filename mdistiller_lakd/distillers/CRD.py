"""CRD: Contrastive Representation Distillation (Tian et al., ICLR 2020)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller
from ._common import count_parameters


class Embed(nn.Module):
    """Linear projection of the flattened feature, then L2 normalisation (without an epsilon)."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def contrast_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """NCE loss for (N, K+1) scores whose column 0 is the positive pair; noise is uniform over
    the ``num_data`` training samples."""
    eps = 1e-7
    num_negatives = scores.size(1) - 1
    noise = num_negatives / float(num_data)
    log_positive = torch.log(scores[:, 0] / (scores[:, 0] + (noise + eps)))
    log_negative = torch.log(noise / (scores[:, 1:] + (noise + eps)))
    return -(log_positive.sum() + log_negative.sum()) / scores.shape[0]


class ContrastMemory(nn.Module):
    """Memory banks of the student and teacher embeddings of every training sample.

    Buffer names and layout are upstream's (``params`` = [K, T, Z_student, Z_teacher, momentum],
    ``memory_v1`` student, ``memory_v2`` teacher), so that upstream CRD checkpoints load.
    """

    def __init__(self, feat_dim: int, num_data: int, k: int, temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        self.num_data = num_data
        self.k = k
        self.register_buffer("params", torch.tensor([k, temperature, -1, -1, momentum]))
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_v1", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))

    def _scores(self, memory: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, z_slot: int) -> torch.Tensor:
        """``exp(<memory[idx], v> / T) / Z``; Z is fixed from the first batch to ``mean * num_data``."""
        weights = memory[idx.view(-1)].view(v.size(0), -1, v.size(1))
        scores = torch.exp(torch.bmm(weights, v.unsqueeze(2)).squeeze(2) / self.params[1].item())
        if self.params[z_slot].item() < 0:
            self.params[z_slot] = scores.detach().mean() * self.num_data
        return scores / self.params[z_slot].item()

    @torch.no_grad()
    def _update(self, memory: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> None:
        """Momentum-average the samples' entries towards ``v`` and renormalise them."""
        momentum = self.params[4].item()
        updated = memory[y] * momentum + v * (1 - momentum)
        memory.index_copy_(0, y, updated / updated.pow(2).sum(1, keepdim=True).pow(0.5))

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None):
        """Scores of the student embeddings ``v1`` against the teacher bank and of ``v2`` against
        the student bank, for the sample indices ``y`` and the (N, K+1) candidates ``idx``."""
        if idx is None:  # upstream draws uniformly, the positive in column 0
            idx = torch.randint(0, self.num_data, (v1.size(0), self.k + 1), device=v1.device)
            idx[:, 0] = y
        out_v2 = self._scores(self.memory_v1, v2, idx, z_slot=3)
        out_v1 = self._scores(self.memory_v2, v1, idx, z_slot=2)
        self._update(self.memory_v1, v1, y)
        self._update(self.memory_v2, v2, y)
        return out_v1, out_v2


class CRD(Distiller):
    """Contrastive distillation of the pooled features (``cfg.CRD``).

    ``num_data`` (the training-set size, the memory banks' length) comes from the dataset:
    ``CRD(student, teacher, cfg, num_data=num_data)``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg, num_data: int):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.CRD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.CRD.LOSS.FEAT_WEIGHT
        self.num_data = num_data
        self.embed_s = Embed(cfg.CRD.FEAT.STUDENT_DIM, cfg.CRD.FEAT.DIM)
        self.embed_t = Embed(cfg.CRD.FEAT.TEACHER_DIM, cfg.CRD.FEAT.DIM)
        self.contrast = ContrastMemory(
            cfg.CRD.FEAT.DIM, num_data, cfg.CRD.NCE.K, cfg.CRD.NCE.TEMPERATURE, cfg.CRD.NCE.MOMENTUM
        )

    @classmethod
    def build_kwargs(cls, cfg, student: nn.Module, num_classes: int, num_data: int) -> dict:
        return {"num_data": num_data}

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        return (
            super().get_learnable_parameters()
            + list(self.embed_s.parameters())
            + list(self.embed_t.parameters())
        )

    def get_extra_parameters(self) -> int:
        # Upstream counts the memory banks (and the five-entry params buffer) too.
        return count_parameters(self.embed_s, self.embed_t) + sum(b.numel() for b in self.contrast.buffers())

    def crd_loss(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor, contrast_idx: torch.Tensor | None):
        for key, embed, feature in (("STUDENT_DIM", self.embed_s, f_s), ("TEACHER_DIM", self.embed_t, f_t)):
            if feature.shape[1] != embed.linear.in_features:
                raise ValueError(
                    f"CRD.FEAT.{key} is {embed.linear.in_features} but the model's pooled feature "
                    f"has {feature.shape[1]} channels: set CRD.FEAT.{key}: {feature.shape[1]}"
                )
        out_s, out_t = self.contrast(self.embed_s(f_s), self.embed_t(f_t), idx, contrast_idx)
        return contrast_loss(out_s, self.num_data) + contrast_loss(out_t, self.num_data)

    def forward_train(
        self,
        image: torch.Tensor,
        target: torch.Tensor,
        index: torch.Tensor,
        contrastive_index: torch.Tensor | None = None,
        **kwargs,
    ):
        pooled_teacher = self.teacher_outputs(image)[1]["pooled_feat"]
        logits_student, feature_student = self.student(image)
        loss_crd = self.crd_loss(feature_student["pooled_feat"], pooled_teacher, index, contrastive_index)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight * loss_crd,
        }
        return logits_student, losses_dict
