"""Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer" (ICLR 2017)."""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from ..errors import ConfigError
from .fitnet import FeatureDistiller
from .registry import register

__all__ = ["AT"]


@register("at")
class AT(FeatureDistiller):
    """AT (Zagoruyko & Komodakis, ICLR 2017): match L2-normalised spatial attention maps.

    For every tap pair, :func:`flowdistill.losses.at` compares the activation-based
    attention maps :math:`\\sum_c |A_c|^p` (``p = 2``) of student and teacher, summed over
    pairs and weighted by ``at_weight = 1000`` as in the authors' code and RepDistiller
    (cross-entropy weight 1). Maps of different resolution are average-pooled to the
    smaller; channel counts may differ; token sequences count as spatial features. Vectors
    have no attention map and are refused.
    """

    tune_grid = {"at_weight": [250.0, 1000.0], "kd_weight": [0.0, 1.0]}

    kinds = ("map", "tokens")
    same_family = True
    needs = (
        " (attention transfer needs spatial features: tap a convolutional stage or a token "
        "sequence, not a vector)"
    )

    def __init__(
        self,
        teacher,
        student,
        *,
        p: float = 2.0,
        at_weight: float = 1000.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, **base)
        if p <= 0:
            raise ConfigError(f"at: p must be positive, got {p}")
        self.p = float(p)
        self.at_weight = float(at_weight)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s_feats, t_feats, s_logits, t_logits = self.features(inputs)
        loss = sum(losses.at(s, t, self.p) for s, t in zip(s_feats, t_feats, strict=True))
        terms = self.logit_terms(s_logits, t_logits, targets)
        terms["at"] = self.at_weight * loss
        return self.total(terms)
