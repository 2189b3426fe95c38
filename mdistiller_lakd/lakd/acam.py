"""ACAM-KD's per-stage block and losses (docs/ACAM_KD.md): student-teacher cross-attention feature
fusion (STCA-FF), adaptive spatial and channel masks (ASCM), the masked feature losses and the Dice
diversity loss.

Marked as in the docs: [paper] the published method (as reported by paper notes: no official code
exists), [MasKD] the normalisation taken from MasKD, which ACAM-KD extends, [ours] a choice of this
project.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sdm import Connector

EPS = 1e-12  # keeps the ratios finite when every mask of a sample is ~0


class ACAMBlock(nn.Module):
    """One distilled stage: f_align, the fusion projections W_q, W_k, W_v and the selection units.

    ``forward(feature_student, feature_teacher)`` returns the aligned student feature
    ``(B, C_t, H, W)``, the spatial masks ``(B, M, H*W)`` and the channel masks ``(B, M, C_t)``,
    all in (0, 1).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], num_masks: int, qk_ratio: float):
        super().__init__()
        channels = teacher_shape[0]
        qk_channels = max(1, round(channels * qk_ratio))
        # [ours] f_align: identity when (C, H, W) agree, else LAKD's resize + 1x1 conv + BN.
        self.align = Connector(student_shape, teacher_shape)
        # [paper] single-head linear maps without bias (PyTorch's default conv init).
        self.query = nn.Conv2d(channels, qk_channels, kernel_size=1, bias=False)
        self.key = nn.Conv2d(channels, qk_channels, kernel_size=1, bias=False)
        self.value = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        # [paper] M spatial units m_s (M x C) and M channel units m_c (M x 1); [MasKD] N(0, 0.01^2)
        # init, so every mask starts at about 1/2.
        self.spatial_units = nn.Parameter(torch.randn(num_masks, channels) * 0.01)
        self.channel_units = nn.Parameter(torch.randn(num_masks, 1) * 0.01)

    def fuse(self, feature_teacher: torch.Tensor, aligned_student: torch.Tensor) -> torch.Tensor:
        """STCA-FF [paper]: queries from the teacher, keys and values from the student;
        ``(B, N, C)`` with row i = sum_j softmax_j(q_i . k_j / sqrt(C_q)) v_j."""
        tokens = lambda x: x.flatten(2).transpose(1, 2).unsqueeze(1)  # noqa: E731  (B, 1 head, N, C)
        query = tokens(self.query(feature_teacher))
        key, value = tokens(self.key(aligned_student)), tokens(self.value(aligned_student))
        # SDPA's default scale is 1/sqrt(C_q); its memory-efficient kernels avoid holding A on CUDA.
        return F.scaled_dot_product_attention(query, key, value).squeeze(1)

    def forward(
        self, feature_student: torch.Tensor, feature_teacher: torch.Tensor, detach_student: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        aligned = self.align(feature_student, feature_teacher.shape[-2:])
        # [ours] MASK_GRAD "detached": the mask branch reads sg(f_align(F_S)), so only the
        # diversity loss trains it and it never moves the student.
        fused = self.fuse(feature_teacher, aligned.detach() if detach_student else aligned)
        spatial = torch.sigmoid(fused @ self.spatial_units.t()).transpose(1, 2)  # (B, M, N) [paper]
        pooled = fused.mean(dim=1)  # (B, C): the fused map averaged over positions [paper]
        channel = torch.sigmoid(self.channel_units.unsqueeze(0) * pooled.unsqueeze(1))  # (B, M, C) [paper]
        return aligned, spatial, channel


def masked_feature_losses(
    aligned_student: torch.Tensor, feature_teacher: torch.Tensor, spatial: torch.Tensor, channel: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_s, L_c)`` [paper; MasKD's normalisation]: per mask, the squared difference weighted by
    the squared mask, divided by the mask's mass times the other dimension; the mean over masks
    and samples. Computed from per-position and per-channel sums, without (B, M, C, N) tensors."""
    difference = (feature_teacher - aligned_student).pow(2).flatten(2)  # (B, C, N)
    channels, positions = difference.shape[1:]
    per_position, per_channel = difference.sum(dim=1), difference.sum(dim=2)  # (B, N), (B, C)

    def weighted(masks: torch.Tensor, summed: torch.Tensor, other: int) -> torch.Tensor:
        numerator = (masks.pow(2) * summed.unsqueeze(1)).sum(dim=2)  # (B, M)
        return (numerator / (other * masks.sum(dim=2) + EPS)).mean()

    return weighted(spatial, per_position, channels), weighted(channel, per_channel, positions)


def dice_diversity(masks: torch.Tensor) -> torch.Tensor:
    """Mean pairwise Dice coefficient of ``masks`` ``(B, M, K)`` over samples and ordered pairs
    i != j [ours: MasKD's pairwise form]; 0 for a single mask."""
    num_masks = masks.shape[1]
    if num_masks < 2:
        return masks.new_zeros(())
    inner = masks @ masks.transpose(1, 2)  # (B, M, M)
    squared = torch.diagonal(inner, dim1=1, dim2=2)  # (B, M)
    dice = 2 * inner / (squared.unsqueeze(2) + squared.unsqueeze(1) + EPS)
    off_diagonal = ~torch.eye(num_masks, dtype=torch.bool, device=masks.device)
    return dice[:, off_diagonal].mean()
