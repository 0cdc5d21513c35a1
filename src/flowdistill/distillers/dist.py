"""Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS 2022)."""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from ..errors import ConfigError
from ..taps import LOGITS
from .base import Distiller
from .registry import register

__all__ = ["DIST"]


@register("dist")
class DIST(Distiller):
    """DIST (Huang et al., NeurIPS 2022): match inter- and intra-class Pearson relations.

    Cross-entropy plus the inter- and intra-class Pearson relations of the softened outputs.

    The loss is :func:`flowdistill.losses.dist`, ``T² (beta·inter + gamma·intra)`` with
    ``beta = gamma = 1``. Defaults follow the authors' CIFAR-100 configuration
    (``dist_cifar.yaml``: ``kd: dist_t4``): ``temperature = 4``, loss weight
    ``dist_weight = 2``, cross-entropy weight 1; their ImageNet setting is
    ``temperature = 1`` with the same weights.
    """

    masks_padding = True

    tune_grid = {"temperature": [1.0, 4.0], "dist_weight": [1.0, 2.0]}

    def __init__(
        self,
        teacher,
        student,
        *,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 4.0,
        dist_weight: float = 2.0,
        ce_weight: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if temperature <= 0:
            raise ConfigError(f"dist: temperature must be positive, got {temperature}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.dist_weight = float(dist_weight)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_forward(inputs)[LOGITS]
        s_logits = self.student_forward(inputs)[LOGITS]
        mask = self.token_mask(targets)  # padding left out (None for class labels)
        dist = losses.dist(s_logits, t_logits, self.beta, self.gamma, self.temperature, mask=mask)
        return self.total(
            {
                "ce": self.ce_weight * self.cross_entropy(s_logits, targets),
                "dist": self.dist_weight * dist,
            }
        )
