"""Student-versus-teacher metrics on a labelled set, from top-1 predictions (analysis tools import these)."""
from __future__ import annotations

import torch


def extracurricular_knowledge(
    student_pred: torch.Tensor, teacher_pred: torch.Tensor, target: torch.Tensor
) -> float:
    """EK = #{student right and teacher wrong} / #{teacher wrong} * 100 (LAKD paper, Table 5).

    The share of the teacher's mistakes that the student gets right; 0 when the teacher makes none.
    """
    teacher_wrong = teacher_pred.ne(target)
    num_teacher_wrong = int(teacher_wrong.sum())
    if num_teacher_wrong == 0:
        return 0.0
    student_right = student_pred.eq(target)
    return (student_right & teacher_wrong).sum().item() / num_teacher_wrong * 100.0


def top1_agreement(student_pred: torch.Tensor, teacher_pred: torch.Tensor) -> float:
    """Percentage of samples on which student and teacher predict the same class."""
    return student_pred.eq(teacher_pred).float().mean().item() * 100.0
