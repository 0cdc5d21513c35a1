"""Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
Correlation Coefficient" (NeurIPS 2022)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..adapters import feature_kind, make_adapter
from .fitnet import FeatureDistiller
from .registry import register

__all__ = ["PKD"]


class _Resize(nn.Module):
    """Resize a student feature to the teacher's positions without parameters: bilinear for
    maps (as mmrazor's ``PKDLoss`` with ``resize_stu=True``), linear along the token axis
    for token sequences."""

    def __init__(self, dst: tuple[int, ...]) -> None:
        super().__init__()
        self.dst = tuple(dst)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return F.interpolate(x, size=self.dst[1:], mode="bilinear", align_corners=False)
        y = F.interpolate(x.transpose(1, 2), size=self.dst[0], mode="linear")
        return y.transpose(1, 2)


def _channels(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) == 3 else shape[-1]


@register("pkd")
class PKD(FeatureDistiller):
    """PKD (Cao et al., NeurIPS 2022): MSE of per-channel standardised features (1 − Pearson r).

    For every tap pair both features are standardised per channel over the batch and all
    positions and compared by :func:`flowdistill.losses.pkd` (half the mean squared error),
    summed over pairs and weighted by ``pkd_weight = 1`` (the default of the authors'
    ``PKDLoss``; their COCO configs raise it to 6–10 per FPN level). The loss ignores the
    scale and offset of every channel, so features of very different magnitudes can be
    matched. Student features of the teacher's channel count are only resized to the
    teacher's positions (bilinearly, as the authors' code); other channel counts go through
    a 1×1 convolution / linear adapter first (the paper assumes equal widths).
    """

    masks_padding = True

    tune_grid = {"pkd_weight": [0.1, 1.0], "kd_weight": [0.0, 1.0]}

    def __init__(self, teacher, student, *, pkd_weight: float = 1.0, **base: Any) -> None:
        super().__init__(teacher, student, **base)
        self.pkd_weight = float(pkd_weight)
        adapters = []
        for s, t in self.pair_shapes:
            if s == t:
                adapters.append(nn.Identity())
            elif feature_kind(s) == feature_kind(t) != "vector" and _channels(s) == _channels(t):
                adapters.append(_Resize(t))
            else:
                adapters.append(make_adapter(s, t))
        self.adapters = nn.ModuleList(adapters)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s_feats, t_feats, s_logits, t_logits = self.features(inputs)
        loss = 0.0
        for adapter, s, t, (_, tap) in zip(
            self.adapters, s_feats, t_feats, self.pairs, strict=True
        ):
            mask = self.feature_mask(targets, t, f"teacher tap {tap!r}", inputs)
            loss = loss + losses.pkd(adapter(s), t, mask=mask)
        terms = self.logit_terms(s_logits, t_logits, targets)
        terms["pkd"] = self.pkd_weight * loss
        return self.total(terms)
