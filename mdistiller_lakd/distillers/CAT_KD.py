"""CAT-KD: Class Attention Transfer Based Knowledge Distillation (Guo et al., CVPR 2023).

CAT-KD swaps each model's pooled classifier for a 1x1 convolution (its "_test" models) to read the
class activation maps. Here both models stay unmodified: a hook records the map each classifier
pools, and the maps are that map convolved (1x1, no bias) with the classifier weight, which is
what the swapped-in convolution computes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lakd.cam import HeadMapHook, cat_loss, class_activation_maps, classifier_weight, pooled_class_maps
from ._base import Distiller


class CAT_KD(Distiller):
    """Cross-entropy plus class attention transfer on the last maps (``cfg.CAT_KD``).

    ``onlyCAT`` drops the cross-entropy term (CAT-KD's "CAT" setting), ``IF_BINARIZE`` binarises
    the teacher's maps and ``IF_NORMALIZE`` L2-normalises the pooled maps, as in CAT-KD.
    """

    task_loss_key = "loss_CE"  # upstream CAT-KD's key

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        if cfg.CAT_KD.IF_OnlyTransferPartialCAMs:
            raise ValueError(
                "CAT_KD.IF_OnlyTransferPartialCAMs: transferring only some classes' maps is one of "
                "CAT-KD's analysis experiments and is not supported here; set it to False"
            )
        self.ce_loss_weight = cfg.CAT_KD.LOSS.CE_WEIGHT
        self.cat_loss_weight = cfg.CAT_KD.LOSS.CAT_loss_weight
        self.cam_resolution = cfg.CAT_KD.LOSS.CAM_RESOLUTION
        self.only_cat = cfg.CAT_KD.onlyCAT
        if self.only_cat:
            self.task_loss_key = None
        self.normalize = cfg.CAT_KD.IF_NORMALIZE
        self.binarize = cfg.CAT_KD.IF_BINARIZE
        self.student_head = HeadMapHook(student)
        self.teacher_head = HeadMapHook(teacher)

    def class_maps(self, model: nn.Module, head: HeadMapHook, pooled: bool = True) -> torch.Tensor:
        """The class maps of ``model``'s last forward, pooled to CAM_RESOLUTION unless ``pooled`` is
        False; releases the recorded map."""
        if pooled:
            return pooled_class_maps(head.take(), classifier_weight(model), self.cam_resolution)
        return class_activation_maps(head.take(), classifier_weight(model))

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        self.teacher_outputs(image)  # only the map its head hook records is used
        with torch.no_grad():
            # IF_BINARIZE thresholds the teacher's full maps, so they are pooled after it.
            cam_teacher = self.class_maps(self.teacher, self.teacher_head, pooled=not self.binarize)
        logits_student, _ = self.student(image)
        cam_student = self.class_maps(self.student, self.student_head)
        loss_cat = self.cat_loss_weight * cat_loss(
            cam_student, cam_teacher, self.cam_resolution, self.normalize, self.binarize
        )
        if self.only_cat:
            return logits_student, {"loss_CAT": loss_cat}
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        return logits_student, {"loss_CE": loss_ce, "loss_CAT": loss_cat}
