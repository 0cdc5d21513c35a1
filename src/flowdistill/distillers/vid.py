"""Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import losses
from ..errors import ConfigError
from ..losses.feature import as_map, map_shape, pool_to_common
from .fitnet import FeatureDistiller
from .registry import register

__all__ = ["VID"]


class _VIDHead(nn.Module):
    """The variational head of one tap pair: a regressor of three 1×1 convolutions (no bias,
    ReLU between; hidden width = teacher channels) predicting the mean, and one learned
    variance parameter per teacher channel (softplus-parameterised)."""

    def __init__(self, s_channels: int, t_channels: int, init_var: float, eps: float) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(t_channels, t_channels, kernel_size=1, bias=False),
        )
        # softplus(log_scale) + eps == init_var at the start
        start = math.log(math.expm1(init_var - eps))
        self.log_scale = nn.Parameter(torch.full((t_channels,), start))


@register("vid")
class VID(FeatureDistiller):
    """VID (Ahn et al., CVPR 2019): maximise a variational lower bound on mutual information.

    For every tap pair a regressor of 1×1 convolutions predicts the mean of a
    heteroscedastic Gaussian over the teacher feature, with a learned per-channel variance
    :math:`\\mathrm{softplus}(\\alpha_c) + 10^{-5}` initialised at 5; the loss is its negative
    log-likelihood (:func:`flowdistill.losses.vid`), summed over pairs and weighted by
    ``vid_weight = 1``. Defaults as in the authors' code as ported by RepDistiller
    (``init_var = 5``, ``eps = 1e-5``, ``-b 1``, cross-entropy weight 1). Maps of different
    resolution are average-pooled to the smaller before the regressor; tokens are viewed as
    maps and vectors as 1×1 maps (1×1 convolutions are then linear layers).
    """

    tune_grid = {"vid_weight": [0.1, 1.0], "kd_weight": [0.0, 1.0]}

    kinds = ("vector", "map", "tokens")
    same_family = True

    def __init__(
        self,
        teacher,
        student,
        *,
        init_var: float = 5.0,
        eps: float = 1e-5,
        vid_weight: float = 1.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, **base)
        if not init_var > eps > 0:
            raise ConfigError(f"vid: need init_var > eps > 0, got {init_var} and {eps}")
        self.eps = float(eps)
        self.vid_weight = float(vid_weight)
        self.heads = nn.ModuleList(
            _VIDHead(map_shape(s)[0], map_shape(t)[0], float(init_var), self.eps)
            for s, t in self.pair_shapes
        )

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s_feats, t_feats, s_logits, t_logits = self.features(inputs)
        loss = 0.0
        for head, s, t in zip(self.heads, s_feats, t_feats, strict=True):
            s_map, t_map = pool_to_common(as_map(s), as_map(t))
            loss = loss + losses.vid(head.regressor(s_map), t_map, head.log_scale, self.eps)
        terms = self.logit_terms(s_logits, t_logits, targets)
        terms["vid"] = self.vid_weight * loss
        return self.total(terms)
