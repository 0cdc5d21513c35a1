"""Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer"
(ECCV 2018)."""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from .fitnet import FeatureDistiller
from .registry import register

__all__ = ["PKT"]


@register("pkt")
class PKT(FeatureDistiller):
    """PKT (Passalis & Tefas, ECCV 2018): match cosine-kernel conditional probabilities.

    For every tap pair, :func:`flowdistill.losses.pkt` turns the cosine similarities of the
    batch's flattened features into conditional distributions :math:`p_{j|i}` and takes
    the KL divergence of the student's from the teacher's (the authors' code), summed over
    pairs and weighted by ``pkt_weight = 30000`` (RepDistiller's ``-b 30000``,
    cross-entropy weight 1). The authors tap the penultimate embedding; any vector, map or
    token feature works, with no extra parameters.
    """

    tune_grid = {"pkt_weight": [3000.0, 30000.0], "kd_weight": [0.0, 1.0]}

    def __init__(self, teacher, student, *, pkt_weight: float = 30000.0, **base: Any) -> None:
        super().__init__(teacher, student, **base)
        self.pkt_weight = float(pkt_weight)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s_feats, t_feats, s_logits, t_logits = self.features(inputs)
        loss = sum(losses.pkt(s, t) for s, t in zip(s_feats, t_feats, strict=True))
        terms = self.logit_terms(s_logits, t_logits, targets)
        terms["pkt"] = self.pkt_weight * loss
        return self.total(terms)
