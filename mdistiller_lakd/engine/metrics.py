"""Metrics on a labelled set (analysis tools import these): student-versus-teacher ones from top-1
predictions, and the conditional mutual information of one model's softmax outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


class CMIAccumulator:
    """The conditional mutual information I(X; Ŷ | Y) of a classifier's softmax outputs, streamed.

    With Q_c the mean softmax output of class c and H the entropy,
    CMI = (1/N) Σ_i KL(p_i || Q_{y_i}) = Σ_c (n_c / N) H(Q_c) − (1/N) Σ_i H(p_i),
    so per-class sums of p, the class counts and the summed entropies are all it keeps (no [N, C]
    buffer). Classes without samples drop out. float64 throughout, on the device of the logits.
    """

    def __init__(self) -> None:
        self.class_sums: torch.Tensor | None = None  # [C, C]: row c = Σ_{i: y_i = c} p_i
        self.counts: torch.Tensor | None = None  # [C]
        self.entropy_sum: torch.Tensor | None = None  # Σ_i H(p_i)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        log_p = F.log_softmax(logits.detach().double(), dim=1)
        p = log_p.exp()
        if self.class_sums is None:
            num_classes = logits.size(1)
            self.class_sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=logits.device)
            self.counts = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
            self.entropy_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        self.class_sums.index_add_(0, targets, p)
        self.counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))
        self.entropy_sum -= (p * log_p).sum()

    def centroids(self) -> torch.Tensor:
        """Q: each seen class's mean softmax output (rows of unseen classes are NaN)."""
        return self.class_sums / self.counts.unsqueeze(1)

    def compute(self) -> float:
        if self.counts is None or self.counts.sum() == 0:
            raise ValueError("no sample seen: the CMI of an empty set is undefined")
        seen = self.counts > 0
        centroids = self.centroids()[seen]
        class_entropy = -torch.xlogy(centroids, centroids).sum(1)  # 0·log 0 = 0
        total = self.counts.sum()
        return ((self.counts[seen] * class_entropy).sum() / total - self.entropy_sum / total).item()


def conditional_mutual_information(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """I(X; Ŷ | Y) of ``logits`` [N, num_classes] with true labels ``targets`` [N] (see
    ``CMIAccumulator``; a whole set at once)."""
    if logits.dim() != 2 or logits.size(1) != num_classes:
        raise ValueError(f"logits of shape [N, {num_classes}] expected, got {tuple(logits.shape)}")
    accumulator = CMIAccumulator()
    accumulator.update(logits, targets)
    return accumulator.compute()
