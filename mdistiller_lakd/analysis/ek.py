"""A student's top-1 predictions against its teacher's on a labelled set: EK and agreement counts."""
from __future__ import annotations

import torch

from ..engine.metrics import extracurricular_knowledge, top1_agreement


def agreement_stats(student_pred: torch.Tensor, teacher_pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Extracurricular Knowledge (%), top-1 agreement (%), both accuracies (%) and the four counts of
    (student right/wrong) x (teacher right/wrong)."""
    student_right, teacher_right = student_pred.eq(target), teacher_pred.eq(target)

    def count(student: torch.Tensor, teacher: torch.Tensor) -> int:
        return int((student & teacher).sum())

    return {
        "images": len(target),
        "ek": extracurricular_knowledge(student_pred, teacher_pred, target),
        "agreement": top1_agreement(student_pred, teacher_pred),
        "student_top1": student_right.float().mean().item() * 100.0,
        "teacher_top1": teacher_right.float().mean().item() * 100.0,
        "both_right": count(student_right, teacher_right),
        "student_right_teacher_wrong": count(student_right, ~teacher_right),
        "student_wrong_teacher_right": count(~student_right, teacher_right),
        "both_wrong": count(~student_right, ~teacher_right),
    }
