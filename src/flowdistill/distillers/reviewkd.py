"""Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..errors import ConfigError
from ..losses.feature import as_map, map_shape
from .dkd import check_warmup, warmup_length
from .fitnet import FeatureDistiller
from .registry import register

__all__ = ["ABF", "ReviewKD"]


class ABF(nn.Module):
    """Attention-based fusion: a 1×1 conv + BN maps the student feature to ``mid``
    channels; when ``fuse``, the residual from the deeper level is resized (nearest) to this
    level, and a 1×1 conv + sigmoid predicts two spatial attention maps that weight the sum
    of the two; the result is resized to the teacher's resolution and a 3×3 conv + BN maps
    it to the teacher's channels. Returns ``(output, residual)``."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
            if fuse
            else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        out_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ConfigError("ABF: a fusing level needs the deeper level's residual")
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


@register("reviewkd")
class ReviewKD(FeatureDistiller):
    """ReviewKD (Chen et al., CVPR 2021): fuse student stages deep-to-shallow (ABF), match by HCL.

    ``student_taps``/``teacher_taps`` list the distilled stages from shallow to deep (the
    authors use every stage plus the pooled feature, as a 1×1 map). Starting from the
    deepest, each student stage is fused with the residual of the deeper ones by an
    :class:`ABF` module (``mid_channels = min(512, channels of the deepest student tap)``)
    whose output, at the teacher stage's resolution and width, is matched to the teacher
    stage by the hierarchical context loss :func:`flowdistill.losses.hcl` (pyramid levels
    4, 2, 1). The authors take the teacher's stages before their last ReLU (on the zoo's
    models, :meth:`~flowdistill.models.cifar.ZooNet.preact_taps`; the standard suites do).
    The loss is weighted by ``review_weight = 1`` (the default of the authors' training
    script; their published CIFAR-100 runs set it per pair: 5 for resnet32x4 → resnet8x4
    and the WRN pairs, 0.6 for resnet56 → resnet20, which the standard suites use) and
    warmed up linearly as ``min(e / W, 1)`` in 0-based epoch ``e`` (cross-entropy
    weight 1), with ``W = warmup_epochs = 20`` epochs of a ``reference_epochs = 240`` run as
    in the authors' CIFAR code, shortened in proportion for a shorter run as ``dkd`` and
    ``nd`` do (``reference_epochs=None`` keeps 20 epochs whatever the run's length); outside
    the engine (no ``on_epoch_start``) the full weight applies. Tokens are viewed as maps,
    vectors as 1×1 maps; one tap pair works too (a single ABF without fusion).
    """

    tune_grid = {"review_weight": [0.5, 1.0], "kd_weight": [0.0, 1.0]}

    same_family = True

    def __init__(
        self,
        teacher,
        student,
        *,
        review_weight: float = 1.0,
        warmup_epochs: float = 20.0,
        reference_epochs: int | None = 240,
        max_mid_channels: int = 512,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, **base)
        check_warmup("reviewkd", warmup_epochs, reference_epochs)
        if max_mid_channels < 1:
            raise ConfigError(
                f"reviewkd: max_mid_channels must be positive, got {max_mid_channels}"
            )
        self.review_weight = float(review_weight)
        self.warmup_epochs = float(warmup_epochs)
        self.reference_epochs = reference_epochs
        self.warmup_factor = 1.0
        s_maps = [map_shape(s) for s, _ in self.pair_shapes]
        t_maps = [map_shape(t) for _, t in self.pair_shapes]
        self.out_sizes = [(h, w) for _, h, w in t_maps]
        mid = min(int(max_mid_channels), s_maps[-1][0])
        last = len(s_maps) - 1
        # abfs[i] serves tap pair i (shallow to deep); all but the deepest fuse a residual
        self.abfs = nn.ModuleList(
            ABF(s[0], mid, t[0], fuse=i < last)
            for i, (s, t) in enumerate(zip(s_maps, t_maps, strict=True))
        )

    def epoch_schedule(self, epoch: int, epochs: int) -> dict[str, float]:
        length = warmup_length(epochs, self.warmup_epochs, self.reference_epochs)
        return {"warmup": 1.0 if length <= 0 else min(epoch / length, 1.0)}

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.warmup_factor = self.epoch_schedule(epoch, epochs)["warmup"]

    def review(self, s_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs for every tap pair (shallow to deep), deepest computed first."""
        outs: list[torch.Tensor] = [None] * len(s_feats)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(s_feats))):
            outs[i], residual = self.abfs[i](as_map(s_feats[i]), residual, self.out_sizes[i])
        return outs

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s_feats, t_feats, s_logits, t_logits = self.features(inputs)
        loss = losses.hcl(self.review(s_feats), [as_map(t) for t in t_feats])
        terms = self.logit_terms(s_logits, t_logits, targets)
        terms["reviewkd"] = self.review_weight * self.warmup_factor * loss
        return self.total(terms)
