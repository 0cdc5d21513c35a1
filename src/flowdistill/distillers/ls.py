"""Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024)."""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from ..errors import ConfigError
from ..taps import LOGITS
from .base import Distiller
from .registry import register

__all__ = ["LS"]


@register("ls")
class LS(Distiller):
    """Logit standardisation (Sun et al., CVPR 2024): KD on per-sample z-scored logits.

    Each network's logits are z-scored over the classes (:func:`flowdistill.losses.
    standardize_logits`, unbiased standard deviation plus ``1e-7``) before the
    T²-scaled KL of :func:`flowdistill.losses.ls`. Defaults are the authors' KD+LS
    setting: base ``temperature = 2``, ``kd_weight = 9``, cross-entropy weight 0.1
    (``--logit-stand --base-temp 2 --kd-weight 9`` on mdistiller's KD configuration).
    """

    masks_padding = True

    tune_grid = {"temperature": [1.0, 2.0], "kd_weight": [1.0, 9.0]}

    def __init__(
        self,
        teacher,
        student,
        *,
        temperature: float = 2.0,
        kd_weight: float = 9.0,
        ce_weight: float = 0.1,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if temperature <= 0:
            raise ConfigError(f"ls: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_forward(inputs)[LOGITS]
        s_logits = self.student_forward(inputs)[LOGITS]
        return self.total(
            {
                "ce": self.ce_weight * self.cross_entropy(s_logits, targets),
                "kd": self.kd_weight
                * losses.ls(s_logits, t_logits, self.temperature, self.token_mask(targets)),
            }
        )
