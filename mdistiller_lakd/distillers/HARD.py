"""HARD: learned hard augmentations for distillation (Nix, Burg, Sinz 2023), our variant.

No code of the paper is public: the augmentor's form (bounded affine + colour transforms), its
objective (the KD divergence minus a teacher-consistency term) and its schedule are ours. Every
``UPDATE_EVERY`` steps the augmentor takes one Adam step to raise teacher-student disagreement on the
batch; the student then distils from the teacher on the clean batch and a fresh augmented draw.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import KINDS, PADDINGS, LearnedAffineAugmentor
from ..engine.distributed import average_gradients
from ._base import CompileTarget, Distiller, ImageGrid
from ._common import count_parameters
from .KD import kd_loss


def _check_config(aug) -> None:
    """ValueError naming the HARD.AUG key at fault."""
    if aug.TYPE not in KINDS:
        raise ValueError(f"HARD.AUG.TYPE must be one of {KINDS}, got {aug.TYPE!r}")
    if aug.PADDING not in PADDINGS:
        raise ValueError(f"HARD.AUG.PADDING must be one of {PADDINGS}, got {aug.PADDING!r}")
    for key in ("LINEAR_MAX", "TRANSLATE_MAX", "GAIN_MAX", "BIAS_MAX", "TEACHER_REG", "LR", "VIS_NUM"):
        if aug[key] < 0:
            raise ValueError(f"HARD.AUG.{key} must be >= 0, got {aug[key]}")
    if aug.LINEAR_MAX >= 1:
        raise ValueError(
            f"HARD.AUG.LINEAR_MAX must be < 1 (the affine matrix could fold the image), got {aug.LINEAR_MAX}"
        )
    for key in ("COMPONENTS", "UPDATE_EVERY"):
        if aug[key] < 1:
            raise ValueError(f"HARD.AUG.{key} must be >= 1, got {aug[key]}")
    if aug.INIT_SIGMA <= 0:
        raise ValueError(f"HARD.AUG.INIT_SIGMA must be > 0, got {aug.INIT_SIGMA}")


class HARD(Distiller):
    """KD on clean and augmented images, the augmentor trained adversarially (``cfg.HARD``)."""

    # The augmentor step back-propagates inside the forward: under torchrun, GradientSync, not DDP.
    local_backward = True

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        hard, aug = cfg.HARD, cfg.HARD.AUG
        _check_config(aug)
        if hard.TEMPERATURE <= 0:
            raise ValueError(f"HARD.TEMPERATURE must be > 0, got {hard.TEMPERATURE}")
        self.temperature = hard.TEMPERATURE
        loss = hard.LOSS
        self.ce_weight, self.kd_weight, self.aug_kd_weight = loss.CE_WEIGHT, loss.KD_WEIGHT, loss.AUG_KD_WEIGHT
        self.teacher_reg, self.update_every = aug.TEACHER_REG, aug.UPDATE_EVERY
        self.num_epoch_images = aug.VIS_NUM
        self.teacher.requires_grad_(False)
        self.augmentor = LearnedAffineAugmentor(
            aug.TYPE, aug.COMPONENTS, aug.LINEAR_MAX, aug.TRANSLATE_MAX, aug.GAIN_MAX, aug.BIAS_MAX,
            aug.INIT_SIGMA, aug.PADDING,
        )
        self.augmentor_optimizer = torch.optim.Adam(self.augmentor.parameters(), lr=aug.LR)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))  # student steps taken
        self._epoch_sums = {"disagreement": 0.0, "teacher_shift": 0.0}
        self._epoch_updates = 0

    def get_extra_parameters(self) -> int:
        return count_parameters(self.augmentor)

    def get_self_optimized_parameters(self) -> list[nn.Parameter]:
        return list(self.augmentor.parameters())

    def get_extra_state(self) -> dict:
        # The epoch's sums too: a mid-epoch checkpoint resumes the epoch's metrics where they were.
        return {"augmentor_optimizer": self.augmentor_optimizer.state_dict(),
                "epoch_sums": dict(self._epoch_sums), "epoch_updates": self._epoch_updates}

    def set_extra_state(self, state: dict) -> None:
        self.augmentor_optimizer.load_state_dict(state["augmentor_optimizer"])
        self._epoch_sums.update(state.get("epoch_sums", {}))  # absent in older checkpoints
        self._epoch_updates = state.get("epoch_updates", 0)

    def disagreement_and_shift(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D, R)`` on one draw: D = T^2 KL(t(x~) || s(x~)) at the KD temperature, R = KL(t(x) || t(x~))."""
        with torch.no_grad():
            logits_clean = self.teacher(image)[0]
        augmented = self.augmentor(image)
        logits_teacher = self.teacher(augmented)[0]
        disagreement = kd_loss(self.student(augmented)[0], logits_teacher, self.temperature)
        return disagreement, kd_loss(logits_teacher, logits_clean, 1.0)

    def update_augmentor(self, image: torch.Tensor) -> dict[str, float]:
        """One Adam step of the augmentor on ``-D + TEACHER_REG * R``; both models in eval mode, in
        float32, gradients reaching the augmentor only (averaged across ranks under torchrun) and
        freed once the step is taken."""
        was_training = self.student.training
        self.student.eval()
        parameters = self.get_self_optimized_parameters()
        try:
            with torch.autocast(image.device.type, enabled=False), torch.enable_grad():
                disagreement, shift = self.disagreement_and_shift(image.float())
                grads = torch.autograd.grad(-disagreement + self.teacher_reg * shift, parameters)
        finally:
            self.student.train(was_training)
        for parameter, grad in zip(parameters, grads):
            parameter.grad = grad
        average_gradients(parameters)
        self.augmentor_optimizer.step()
        # The gradients served this step only: freed now rather than held until the next one.
        self.augmentor_optimizer.zero_grad(set_to_none=True)
        values = {"disagreement": disagreement.item(), "teacher_shift": shift.item()}
        for key, value in values.items():
            self._epoch_sums[key] += value
        self._epoch_updates += 1
        return values

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """One detached draw of the current augmentor, in float32."""
        with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
            return self.augmentor(image.float())

    def compile_plan(self) -> tuple[list[CompileTarget], str]:
        return self.models_only_plan(
            "its augmentor samples random transforms and takes "
            "its own optimizer step inside the forward"
        )

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **kwargs):
        if self.step_count.item() % self.update_every == 0:
            self.update_augmentor(image)
        self.step_count += 1
        both = torch.cat([image, self.augment(image)])
        with torch.no_grad():
            logits_teacher, logits_teacher_aug = self.teacher(both)[0].chunk(2)
        logits_student, logits_student_aug = self.student(both)[0].chunk(2)
        # No cross-entropy on the augmented images: a hard augmentation may change the label.
        losses_dict = {
            "loss_ce": self.ce_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.kd_weight * kd_loss(logits_student, logits_teacher, self.temperature),
            "loss_kd_aug": self.aug_kd_weight * kd_loss(logits_student_aug, logits_teacher_aug, self.temperature),
        }
        return logits_student, losses_dict

    def visualize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(clean, augmented)``: ``images`` and one draw of the current augmentor, normalised."""
        return images, self.augment(images)

    def epoch_metrics(self) -> dict[str, float]:
        updates = max(self._epoch_updates, 1)
        metrics = {f"hard/{key}": total / updates for key, total in self._epoch_sums.items()}
        self._epoch_sums = dict.fromkeys(self._epoch_sums, 0.0)
        self._epoch_updates = 0
        with torch.no_grad():
            metrics["hard/sigma_mean"] = self.augmentor.log_sigma.exp().mean().item()
            # Fixed noise: the statistic follows the parameters alone, comparable across epochs.
            fixed = torch.Generator(device=self.augmentor.mu.device).manual_seed(0)
            metrics["hard/u_abs_mean"] = self.augmentor.u_abs_mean(self.augmentor.draw(256, fixed))
        return metrics

    def epoch_images(self, images: torch.Tensor) -> list[ImageGrid]:
        return [ImageGrid("hard_aug", "hard/augmented", torch.stack(self.visualize(images)))]
