"""LAKD: Activation Mapping Distillation Based on Local Learning (Zhang et al.).

The student is cut at ``LAKD.LOCATIONS`` into local modules (SDM): module k < K learns only from
its feature loss against the teacher, module K from CAT-KD's cross-entropy + class attention
transfer; NDAM re-weights the feature entering each next module, in training and at test time.
Everything acts through forward hooks on the unmodified student (docs/METHOD.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lakd.blocks import check_locations, find_blocks, stage_start_locations
from ..lakd.cam import HeadMapHook, cat_loss, classifier_weight, pooled_class_maps
from ..lakd.ndam import attach_ndam
from ..lakd.sdm import Connector, LocalModules, probe_shapes, resolution_matched
from ._base import CompileTarget, Distiller


class LAKD(Distiller):
    """``forward_train`` returns ``loss_local_1 .. loss_local_<K-1>`` (and ``loss_local_<K>`` when
    FINAL_FEAT_WEIGHT > 0), ``loss_ce`` and ``loss_cat``. With ``BACKWARD: eager`` (and DETACH)
    the local losses were back-propagated during the forward and are returned detached, for
    logging; summing the dict and back-propagating it trains the rest, as for any distiller."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        lakd, loss = cfg.LAKD, cfg.LAKD.LOSS
        if lakd.BACKWARD not in ("eager", "joint"):
            raise ValueError(f"LAKD.BACKWARD: '{lakd.BACKWARD}' is not one of 'eager', 'joint'")
        student_name = cfg.DISTILLER.STUDENT or type(student).__name__
        blocks = [block for _, block in find_blocks(student)]
        input_size = 224 if cfg.DATASET.TYPE == "imagenet" else 32
        block_shapes, teacher_shapes = probe_shapes(student, blocks, teacher, input_size)
        rule = stage_start_locations([shape[1:] for shape in block_shapes])
        hint = f"; LAKD's rule, the first block of each stage but the last, then the last block, gives {rule}"
        self.locations = check_locations(student_name, len(blocks), lakd.LOCATIONS, hint=hint)
        num_cuts = len(self.locations) - 1
        hooked = self.locations if loss.FINAL_FEAT_WEIGHT > 0 else self.locations[:-1]
        stages = self._teacher_stages(
            lakd.TEACHER_STAGES, len(self.locations), [block_shapes[l - 1] for l in hooked], teacher_shapes
        )
        self.teacher_stages = stages
        self.sdm = LocalModules(
            blocks=[blocks[l - 1] for l in hooked],
            connectors=[Connector(block_shapes[l - 1], teacher_shapes[s]) for l, s in zip(hooked, stages)],
            weights=[loss.FEAT_WEIGHT] * num_cuts + [loss.FINAL_FEAT_WEIGHT] * (len(hooked) - num_cuts),
            num_cuts=num_cuts,
            detach=lakd.DETACH,
            # Without DETACH the final loss needs every module's graph: one joint backward.
            eager=lakd.BACKWARD == "eager" and lakd.DETACH,
        )
        enabled = lakd.NDAM.ENABLE
        self.ndam = {
            "locations": self.locations,
            "abs": lakd.NDAM.ABS,
            "avg_weight": lakd.NDAM.AVG_WEIGHT if enabled else 0.0,
            "max_weight": lakd.NDAM.MAX_WEIGHT if enabled else 0.0,
        }
        attach_ndam(student, **self.ndam)  # after the SDM hooks: NDAM weights the detached feature
        self.ce_weight, self.cat_weight = loss.CE_WEIGHT, loss.CAT_WEIGHT
        self.cam_resolution, self.normalize = loss.CAM_RESOLUTION, loss.IF_NORMALIZE
        self.student_head, self.teacher_head = HeadMapHook(student), HeadMapHook(teacher)

    @staticmethod
    def _teacher_stages(stages, num_locations: int, feature_shapes, teacher_shapes) -> list[int]:
        """t_s(k) per hooked location: ``TEACHER_STAGES`` (one per location, or per cut k < K),
        else the deepest teacher stage of the same spatial size."""
        num_stages, stages = len(teacher_shapes), list(stages)
        if stages:
            if len(stages) not in (num_locations, num_locations - 1) or not all(
                isinstance(s, int) and 0 <= s < num_stages for s in stages
            ):
                raise ValueError(
                    f"LAKD.TEACHER_STAGES {stages}: give one index per location (or per cut, "
                    f"k < K), each in 0..{num_stages - 1} (the teacher has {num_stages} feats)"
                )
            stages = stages[: len(feature_shapes)]
        teacher_sizes = [shape[1:] for shape in teacher_shapes]
        for k, shape in enumerate(feature_shapes[len(stages):], start=len(stages)):
            stage = resolution_matched(shape[1:], teacher_sizes)
            if stage is None:
                raise ValueError(
                    f"LAKD: no teacher stage has the spatial size {tuple(shape[1:])} of the student's "
                    f"location {k + 1}; the teacher's feats are {[tuple(s) for s in teacher_sizes]}. "
                    "Set LAKD.TEACHER_STAGES"
                )
            stages.append(stage)
        return stages

    @property
    def local_backward(self) -> bool:
        """True when the forward back-propagates the local losses itself (eager mode)."""
        return self.sdm.eager

    @property
    def grad_scaler(self):
        """The trainer's fp16 GradScaler, which the eager local losses must be scaled by too."""
        return self.sdm.grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler) -> None:
        self.sdm.grad_scaler = scaler

    def compile_plan(self) -> tuple[list[CompileTarget], str]:
        """Joint backward: the whole training forward, hooks traced into its graph. Eager backward
        back-propagates inside the cut blocks' forward hooks, which a graph cannot hold: each block's
        own forward is compiled (its hooks run eagerly around it), and the teacher."""
        if not self.local_backward:
            return super().compile_plan()
        blocks = [CompileTarget("student block", block) for _, block in find_blocks(self.student)]
        return [CompileTarget("teacher", self.teacher), *blocks], (
            "the student's stem and head, the SDM/NDAM hooks and the losses (the local losses "
            "back-propagate inside the blocks' forward hooks)"
        )

    def get_learnable_parameters(self) -> list[nn.Parameter]:
        return super().get_learnable_parameters() + list(self.sdm.parameters())

    def get_extra_parameters(self) -> int:
        return sum(p.numel() for p in self.sdm.parameters())

    def student_checkpoint_extras(self) -> dict:
        """What tools/eval.py needs to re-attach NDAM to a plain student (all-zero weights: off)."""
        return {"ndam": dict(self.ndam)}

    def _class_maps(self, model: nn.Module, head: HeadMapHook) -> torch.Tensor:
        """The class maps of ``model``'s last forward pooled to CAM_RESOLUTION (all the loss uses)."""
        return pooled_class_maps(head.take(), classifier_weight(model), self.cam_resolution)

    @torch.no_grad()
    def _teacher_targets(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher features of the hooked locations (the rest are freed) and its pooled class maps."""
        feats = self.teacher(image)[1]["feats"]
        return [feats[s] for s in self.teacher_stages], self._class_maps(self.teacher, self.teacher_head)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        # Teacher first: the local losses need its features the moment the student's cut runs.
        targets, cam_teacher = self._teacher_targets(image)
        with self.sdm.collecting(targets) as losses:
            logits, _ = self.student(image)
        cam_student = self._class_maps(self.student, self.student_head)
        losses["loss_ce"] = self.ce_weight * F.cross_entropy(logits, target)
        losses["loss_cat"] = self.cat_weight * cat_loss(
            cam_student, cam_teacher, self.cam_resolution, self.normalize
        )
        return logits, losses
