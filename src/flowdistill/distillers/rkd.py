"""Park et al., "Relational Knowledge Distillation" (CVPR 2019)."""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from .fitnet import FeatureDistiller
from .registry import register

__all__ = ["RKD"]


@register("rkd")
class RKD(FeatureDistiller):
    """RKD (Park et al., CVPR 2019): match distance-wise and angle-wise sample relations.

    For every tap pair, :func:`flowdistill.losses.rkd` compares the mean-normalised pairwise
    distances (weight ``distance_weight = 25``) and the triplet angles
    (``angle_weight = 50``) of the flattened student and teacher embeddings with a Huber
    loss, as in the authors' code; the sum over pairs is weighted by ``rkd_weight = 1``
    (RepDistiller's ``-b 1``, cross-entropy weight 1). The two potentials are logged as
    ``rkd_distance`` and ``rkd_angle``. The authors tap the penultimate embedding (a
    ``pool`` tap); any vector, map or token feature works, with no extra parameters.
    """

    tune_grid = {"rkd_weight": [0.1, 1.0], "kd_weight": [0.0, 1.0]}

    def __init__(
        self,
        teacher,
        student,
        *,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        rkd_weight: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, **base)
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.rkd_weight = float(rkd_weight)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s_feats, t_feats, s_logits, t_logits = self.features(inputs)
        pairs = list(zip(s_feats, t_feats, strict=True))
        terms = self.logit_terms(s_logits, t_logits, targets)
        if self.distance_weight:
            distance = sum(losses.rkd(s, t, self.distance_weight, 0.0) for s, t in pairs)
            terms["rkd_distance"] = self.rkd_weight * distance
        if self.angle_weight:
            angle = sum(losses.rkd(s, t, 0.0, self.angle_weight) for s, t in pairs)
            terms["rkd_angle"] = self.rkd_weight * angle
        return self.total(terms)
