"""Divergences between next-token distributions for language-model distillation: reverse KL
(Gu et al., "MiniLLM", ICLR 2024) and the skew KLs of Ko et al., "DistiLLM: Towards
Streamlined Distillation for Large Language Models" (ICML 2024)."""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from ..errors import ConfigError
from ..taps import LOGITS
from .base import Distiller
from .registry import register

__all__ = ["ReverseKL", "SkewKL"]


@register("reverse_kl")
class ReverseKL(Distiller):
    """Reverse KL ``KL(q_student || p_teacher)`` per token (mode seeking), plus cross-entropy.

    Tokens whose target is -100 (padding) are left out of both terms. Works on ``(B, V)``
    class logits as well as ``(B, T, V)`` token logits."""

    masks_padding = True

    tune_grid = {"temperature": [1.0, 4.0], "ce_weight": [0.0, 1.0]}

    def __init__(
        self,
        teacher,
        student,
        *,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        **base: Any,
    ) -> None:
        super().__init__(teacher, student, ce_weight=ce_weight, **base)
        if temperature <= 0:
            raise ConfigError(f"{self.name}: temperature must be positive, got {temperature}")
        self.temperature, self.kd_weight = float(temperature), float(kd_weight)

    def divergence(self, s: torch.Tensor, t: torch.Tensor, mask) -> torch.Tensor:
        return losses.reverse_kl(s, t, mask, self.temperature)

    def forward(self, inputs: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = self.teacher_forward(inputs)[LOGITS]
        s_logits = self.student_forward(inputs)[LOGITS]
        terms = {self.name: self.kd_weight * self.divergence(s_logits, t_logits,
                                                             self.token_mask(targets))}  # fmt: skip
        if self.ce_weight:
            terms["ce"] = self.ce_weight * self.cross_entropy(s_logits, targets)
        return self.total(terms)


@register("skew_kl")
class SkewKL(ReverseKL):
    """DistiLLM's skew KL: ``direction="reverse"`` (their SRKL, the default),
    ``KL(q || alpha q + (1 - alpha) p)``, or ``"forward"`` (SKL),
    ``KL(p || alpha p + (1 - alpha) q)``; ``alpha = 0.1`` as the authors use."""

    tune_grid = {"alpha": [0.1, 0.3], "ce_weight": [0.0, 1.0]}

    def __init__(
        self, teacher, student, *, alpha: float = 0.1, direction: str = "reverse", **kw: Any
    ) -> None:
        super().__init__(teacher, student, **kw)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"skew_kl: alpha must lie in [0, 1], got {alpha}")
        if direction not in ("forward", "reverse"):
            raise ConfigError(f"skew_kl: direction must be 'forward' or 'reverse', got "
                              f"{direction!r}")  # fmt: skip
        self.alpha, self.direction = float(alpha), direction

    def divergence(self, s: torch.Tensor, t: torch.Tensor, mask) -> torch.Tensor:
        fn = losses.skew_reverse_kl if self.direction == "reverse" else losses.skew_forward_kl
        return fn(s, t, mask, self.alpha, self.temperature)
