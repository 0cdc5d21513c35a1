"""The student trained alone: the baseline every method is measured against."""

from __future__ import annotations

from typing import Any

import torch

from .base import Distiller
from .registry import register


@register("student")
class Student(Distiller):
    """Student trained alone with cross-entropy; no teacher (the reference row)."""

    masks_padding = True

    uses_teacher = False

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.student_forward(inputs)["logits"]
        return self.total({"ce": self.ce_weight * self.cross_entropy(logits, targets)})
