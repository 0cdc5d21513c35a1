"""Hinton et al., "Distilling the Knowledge in a Neural Network" (2015)."""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from ..errors import ConfigError
from .base import Distiller
from .registry import register


@register("kd")
class KD(Distiller):
    """Hinton KD: cross-entropy plus T²-scaled KL between softened teacher and student outputs."""

    masks_padding = True

    tune_grid = [
        {"temperature": t, "ce_weight": c, "kd_weight": w}
        for t in (1.0, 4.0)
        for c, w in ((0.5, 0.5), (0.1, 0.9))
    ]

    def __init__(
        self,
        teacher,
        student,
        *,
        temperature: float = 4.0,
        kd_weight: float = 0.9,
        ce_weight: float = 0.1,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if temperature <= 0:
            raise ConfigError(f"kd: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_forward(inputs)["logits"]
        s_logits = self.student_forward(inputs)["logits"]
        return self.total(
            {
                "ce": self.ce_weight * self.cross_entropy(s_logits, targets),
                "kd": self.kd_weight * self._kd(s_logits, t_logits, targets),
            }
        )

    def _kd(self, s_logits: torch.Tensor, t_logits: torch.Tensor, targets: torch.Tensor):
        mask = self.token_mask(targets)  # padding left out (None for class labels)
        return losses.kd(s_logits, t_logits, self.temperature, mask)
