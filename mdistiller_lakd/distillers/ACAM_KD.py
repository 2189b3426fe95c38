"""ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge Distillation (Lan and Tian,
ICCV 2025), offered as a classification feature distiller (docs/ACAM_KD.md).

[paper] cross-attention fusion of teacher (queries) and student (keys, values) features, spatial
and channel masks from the fused map, masked feature losses plus a Dice diversity loss.
[ours] the stages distilled (``feats`` entries, default the last), the resolution-matched teacher
stage, LAKD's connector as f_align, the weights' scale, and the gradient routing ``MASK_GRAD``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lakd.acam import ACAMBlock, dice_diversity, masked_feature_losses
from ..lakd.sdm import resolution_matched
from ._base import Distiller
from ._common import count_parameters, get_feat_shapes

MASK_GRAD_MODES = ("detached", "joint")


class ACAM_KD(Distiller):
    """``forward_train`` returns ``loss_ce``, ``loss_acam`` (the masked feature losses of every
    distilled stage) and ``loss_div`` (their masks' Dice diversity). The per-stage blocks live in
    ``self.acam``, outside the student's state_dict."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        acam, loss = cfg.ACAM_KD, cfg.ACAM_KD.LOSS
        if acam.NUM_MASKS < 1:
            raise ValueError(f"ACAM_KD.NUM_MASKS {acam.NUM_MASKS}: at least one mask is needed")
        if not 0 < acam.QK_RATIO <= 1:
            raise ValueError(f"ACAM_KD.QK_RATIO {acam.QK_RATIO} is not in (0, 1]")
        if acam.MASK_GRAD not in MASK_GRAD_MODES:
            raise ValueError(f"ACAM_KD.MASK_GRAD: '{acam.MASK_GRAD}' is not one of {', '.join(MASK_GRAD_MODES)}")
        for key in ("CE_WEIGHT", "FEAT_WEIGHT", "SPATIAL_WEIGHT", "CHANNEL_WEIGHT", "DIV_WEIGHT"):
            if loss[key] < 0:
                raise ValueError(f"ACAM_KD.LOSS.{key} {loss[key]} is negative")
        shapes_s, shapes_t = get_feat_shapes(student, teacher, acam.INPUT_SIZE)
        num_s = len(shapes_s)
        if not acam.STAGES or not all(-num_s <= s < num_s for s in acam.STAGES):
            raise ValueError(
                f"ACAM_KD.STAGES {list(acam.STAGES)}: give one or more indices into the student's "
                f"{num_s} feats, each in {-num_s}..{num_s - 1}"
            )
        self.stages = [s % num_s for s in acam.STAGES]
        self.teacher_stages = self._teacher_stages(list(acam.TEACHER_STAGES), [shapes_s[s] for s in self.stages], shapes_t)
        self.acam = nn.ModuleList(
            ACAMBlock(shapes_s[s][1:], shapes_t[t][1:], acam.NUM_MASKS, acam.QK_RATIO)
            for s, t in zip(self.stages, self.teacher_stages)
        )
        self.detached = acam.MASK_GRAD == "detached"
        self.ce_weight, self.feat_weight, self.div_weight = loss.CE_WEIGHT, loss.FEAT_WEIGHT, loss.DIV_WEIGHT
        self.spatial_weight, self.channel_weight = loss.SPATIAL_WEIGHT, loss.CHANNEL_WEIGHT

    def _teacher_stages(self, stages: list[int], student_shapes, teacher_shapes) -> list[int]:
        """The given TEACHER_STAGES, else per stage the deepest teacher stage of the same H x W."""
        num_t = len(teacher_shapes)
        if stages:
            if len(stages) != len(self.stages) or not all(-num_t <= t < num_t for t in stages):
                raise ValueError(
                    f"ACAM_KD.TEACHER_STAGES {stages}: give one index per entry of ACAM_KD.STAGES "
                    f"{self.stages}, each in {-num_t}..{num_t - 1} (the teacher has {num_t} feats)"
                )
            return [t % num_t for t in stages]
        teacher_sizes = [shape[2:] for shape in teacher_shapes]
        matched = []
        for stage, shape in zip(self.stages, student_shapes):
            index = resolution_matched(shape[2:], teacher_sizes)
            if index is None:
                raise ValueError(
                    f"ACAM_KD.TEACHER_STAGES: no teacher stage has the size {tuple(shape[2:])} of the "
                    f"student's stage {stage} (ACAM_KD.STAGES); the teacher's feats are "
                    f"{[tuple(size) for size in teacher_sizes]}. Give the teacher stages explicitly"
                )
            matched.append(index)
        return matched

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        return super().get_learnable_parameters() + list(self.acam.parameters())

    def get_extra_parameters(self) -> int:
        return count_parameters(self.acam)

    def _teacher_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's features at the matched stages; the rest of its outputs are freed."""
        feats = self.teacher_outputs(image)[1]["feats"]
        return [feats[t] for t in self.teacher_stages]

    def _stage_outputs(self, image: torch.Tensor):
        """Teacher first (no autograd), then the student: ``(logits, [(aligned, spatial, channel,
        teacher feature)] per stage)``, the ACAM branch in float32 with autocast off."""
        targets = self._teacher_features(image)
        logits, feats = self.student(image)
        outputs = []
        with torch.autocast(device_type=image.device.type, enabled=False):
            for block, stage, target in zip(self.acam, self.stages, targets):
                target = target.float()
                outputs.append((*block(feats["feats"][stage].float(), target, self.detached), target))
        return logits, outputs

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        logits, outputs = self._stage_outputs(image)
        loss_acam = loss_div = image.new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=image.device.type, enabled=False):
            for aligned, spatial, channel, feature_teacher in outputs:
                # [ours] "detached": the masks weigh the feature losses as constants.
                weights = (spatial.detach(), channel.detach()) if self.detached else (spatial, channel)
                loss_s, loss_c = masked_feature_losses(aligned, feature_teacher, *weights)
                loss_acam = loss_acam + self.spatial_weight * loss_s + self.channel_weight * loss_c
                loss_div = loss_div + dice_diversity(spatial) + dice_diversity(channel)
        return logits, {
            "loss_ce": self.ce_weight * F.cross_entropy(logits, target),
            "loss_acam": self.feat_weight * loss_acam,
            "loss_div": self.div_weight * loss_div,
        }

    @torch.no_grad()
    def masks(self, image: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per distilled stage (STAGES order): ``{"spatial": (B, M, H, W), "channel": (B, M, C_t)}``,
        the masks ``forward_train`` would use for ``image`` in the current mode (call it in eval
        mode to leave BatchNorm statistics untouched)."""
        _, outputs = self._stage_outputs(image)
        return [
            {"spatial": spatial.unflatten(2, target.shape[-2:]), "channel": channel}
            for _, spatial, channel, target in outputs
        ]
