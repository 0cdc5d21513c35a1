"""Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

This module also holds :class:`FeatureDistiller`, the (unregistered) base of the classic
feature-distillation baselines (``fitnet``, ``at``, ``sp``, ``rkd``, ``pkt``, ``vid``,
``crd``, ``reviewkd``, ``pkd``): it pairs ``student_taps[i]`` with ``teacher_taps[i]``,
checks that each pair is of a kind the method is defined on, and adds the task
cross-entropy plus an optional Hinton KD term (``kd_weight``, 0 by default as in
RepDistiller's commands for these methods, ``-a 0``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .. import losses
from ..adapters import Adapter, feature_kind, make_adapter
from ..errors import ConfigError, ShapeMismatchError
from ..losses.feature import map_shape
from ..taps import LOGITS
from .base import Distiller
from .registry import register

__all__ = ["ConvRegressor", "FeatureDistiller", "FitNet"]

Shape = tuple[int, ...]


def _is_grid(shape: Shape) -> bool:
    """Whether a per-sample shape is a map, or tokens that form a square grid (other tokens
    are viewed as a ``(D, N, 1)`` column by :func:`flowdistill.losses.feature.map_shape`)."""
    _, h, w = map_shape(shape)
    return len(shape) == 3 or not (w == 1 and h > 1)


class FeatureDistiller(Distiller):
    """Base of the feature baselines (not a registered method): tap pairs, checks, CE + KD."""

    needs_shapes = True
    uses_feature_taps = True
    #: feature kinds the method is defined on ("vector", "map", "tokens")
    kinds: ClassVar[tuple[str, ...]] = ("vector", "map", "tokens")
    #: whether a pair must be of the same family (both vectors, or both spatial)
    same_family: ClassVar[bool] = False
    #: the largest number of tap pairs the method takes (None: any)
    max_pairs: ClassVar[int | None] = None
    #: what the method needs, for error messages
    needs: ClassVar[str] = ""

    def __init__(
        self,
        teacher,
        student,
        *,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, **base)
        if temperature <= 0:
            raise ConfigError(f"{self.name}: temperature must be positive, got {temperature}")
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)
        s_taps = list(base.get("student_taps", (LOGITS,)))
        t_taps = list(base.get("teacher_taps", (LOGITS,)))
        if len(s_taps) != len(t_taps) or not s_taps:
            raise ConfigError(
                f"{self.name}: student_taps {s_taps} and teacher_taps {t_taps} must pair up "
                "one to one (student_taps[i] is distilled from teacher_taps[i])"
            )
        if self.max_pairs is not None and len(s_taps) > self.max_pairs:
            raise ConfigError(
                f"{self.name}: takes {self.max_pairs} student tap and {self.max_pairs} teacher "
                f"tap, got {s_taps} and {t_taps}"
            )
        self.pairs: list[tuple[str, str]] = list(zip(s_taps, t_taps, strict=True))
        self.pair_shapes: list[tuple[Shape, Shape]] = []
        for s_tap, t_tap in self.pairs:
            s_shape, t_shape = self.student_shapes[s_tap], self.teacher_shapes[t_tap]
            self._check_pair(s_tap, s_shape, t_tap, t_shape)
            self.pair_shapes.append((s_shape, t_shape))

    def _check_pair(self, s_tap: str, s_shape: Shape, t_tap: str, t_shape: Shape) -> None:
        kinds = []
        for side, tap, shape in (("student", s_tap, s_shape), ("teacher", t_tap, t_shape)):
            kind = feature_kind(shape)
            if kind not in self.kinds:
                raise ShapeMismatchError(
                    f"{self.name}: {side} tap {tap!r} gives a {kind} feature of shape {shape}; "
                    f"{self.name} is defined on {' or '.join(self.kinds)} features{self.needs}"
                )
            kinds.append(kind)
        if not self.same_family:
            return
        vector = [k == "vector" for k in kinds]
        if vector[0] != vector[1]:
            raise ShapeMismatchError(
                f"{self.name}: student tap {s_tap!r} {s_shape} and teacher tap {t_tap!r} "
                f"{t_shape} pair a vector with a spatial feature; tap features of the same "
                "family (vector with vector, map/tokens with map/tokens)"
            )
        if kinds[0] != kinds[1] and not (_is_grid(s_shape) and _is_grid(t_shape)):
            raise ShapeMismatchError(
                f"{self.name}: cannot align student tap {s_tap!r} {s_shape} with teacher tap "
                f"{t_tap!r} {t_shape}: a token sequence paired with a map must form a square "
                "grid (with or without a class token)"
            )

    def features(
        self, inputs: Any
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Paired student and teacher features (in tap-pair order) and both logits."""
        t_out = self.teacher_forward(inputs)
        s_out = self.student_forward(inputs)
        s_feats = [s_out[s] for s, _ in self.pairs]
        t_feats = [t_out[t] for _, t in self.pairs]
        return s_feats, t_feats, s_out[LOGITS], t_out[LOGITS]

    def logit_terms(
        self, s_logits: torch.Tensor, t_logits: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``ce`` (and ``kd`` when ``kd_weight`` is not zero)."""
        terms = {"ce": self.ce_weight * self.cross_entropy(s_logits, targets)}
        if self.kd_weight:
            mask = self.token_mask(targets)  # padding left out (None for class labels)
            kd = losses.kd(s_logits, t_logits, self.temperature, mask)
            terms["kd"] = self.kd_weight * kd
        return terms


class ConvRegressor(nn.Module):
    """FitNets' convolutional regressor from a student map to a teacher map, sized as in
    RepDistiller's ``ConvReg``: a stride-2 3×3 convolution when the student map is twice the
    teacher's size, a stride-2 transposed convolution when it is half, otherwise a
    convolution of kernel ``1 + H_s - H_t`` × ``1 + W_s - W_t`` (1×1 for equal sizes);
    other size pairs (student smaller, not half) use a 1×1 convolution and a bilinear
    resize. Then batch norm and, with ``relu``, a ReLU (FitNets asks the regressor to end in
    the teacher hint layer's non-linearity)."""

    def __init__(self, src: Shape, dst: Shape, relu: bool = True) -> None:
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = src, dst
        self.dst = tuple(dst)
        self.conv: nn.Module
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            self.conv = make_adapter(src, (t_c, t_h, t_w))
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _regressor(src: Shape, dst: Shape, relu: bool) -> nn.Module:
    if len(src) == 3 and len(dst) == 3:
        return ConvRegressor(src, dst, relu=relu)
    return Adapter(src, dst)  # linear (vectors, tokens) or 1×1 conv + grid reshape


@register("fitnet")
class FitNet(FeatureDistiller):
    """FitNets (Romero et al., ICLR 2015): MSE hint between regressed student and teacher features.

    Each ``student_taps[i]`` (guided layer) is mapped by a regressor to the shape of
    ``teacher_taps[i]`` (hint layer) and matched by :func:`flowdistill.losses.hint`; maps
    use FitNets' convolutional regressor (:class:`ConvRegressor`, conv + BN + ReLU as in
    RepDistiller), vectors and tokens a linear one. Defaults follow RepDistiller's FitNet
    benchmark (``-b 100``, cross-entropy weight 1): the hint and the task are trained
    jointly, not in FitNets' original two stages.
    """

    masks_padding = True

    tune_grid = {"hint_weight": [10.0, 100.0], "kd_weight": [0.0, 1.0]}

    def __init__(
        self,
        teacher,
        student,
        *,
        hint_weight: float = 100.0,
        regressor_relu: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, **base)
        self.hint_weight = float(hint_weight)
        self.regressors = nn.ModuleList(
            _regressor(s, t, regressor_relu) for s, t in self.pair_shapes
        )

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s_feats, t_feats, s_logits, t_logits = self.features(inputs)
        hint = 0.0
        for reg, s, t, (_, tap) in zip(self.regressors, s_feats, t_feats, self.pairs, strict=True):
            mask = self.feature_mask(targets, t, f"teacher tap {tap!r}", inputs)
            hint = hint + losses.hint(reg(s), t, mask)
        terms = self.logit_terms(s_logits, t_logits, targets)
        terms["fitnet"] = self.hint_weight * hint
        return self.total(terms)
