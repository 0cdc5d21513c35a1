"""Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019)."""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from .fitnet import FeatureDistiller
from .registry import register

__all__ = ["SP"]


@register("sp")
class SP(FeatureDistiller):
    """SP (Tung & Mori, ICCV 2019): match the row-normalised batch similarity (Gram) matrices.

    For every tap pair, :func:`flowdistill.losses.sp` compares the ``B × B`` similarity
    matrices of the flattened student and teacher features, summed over pairs and weighted
    by ``sp_weight = 3000`` (RepDistiller's setting, verified there by the paper's first
    author; cross-entropy weight 1). Works for maps, tokens and vectors alike; no extra
    parameters.
    """

    tune_grid = {"sp_weight": [300.0, 3000.0], "kd_weight": [0.0, 1.0]}

    def __init__(self, teacher, student, *, sp_weight: float = 3000.0, **base: Any) -> None:
        super().__init__(teacher, student, **base)
        self.sp_weight = float(sp_weight)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s_feats, t_feats, s_logits, t_logits = self.features(inputs)
        loss = sum(losses.sp(s, t) for s, t in zip(s_feats, t_feats, strict=True))
        terms = self.logit_terms(s_logits, t_logits, targets)
        terms["sp"] = self.sp_weight * loss
        return self.total(terms)
